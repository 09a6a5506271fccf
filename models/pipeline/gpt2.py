"""tiny-gpt2: transformers GPT2LMHeadModel with a KV cache in the optimum tensor layout."""
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

CONFIG = dict(vocab_size=4096, n_positions=256, n_embd=128, n_layer=4, n_head=4,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build() -> GPT2LMHeadModel:
    # Eager attention keeps the traced graph free of SDPA shortcuts that ignore padding masks.
    cfg = GPT2Config(**CONFIG, attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


def cache_shape():
    """(layers, key/value heads, head size) of the KV cache."""
    return CONFIG["n_layer"], CONFIG["n_head"], CONFIG["n_embd"] // CONFIG["n_head"]


def lm_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


class CachedGPT2(torch.nn.Module):
    """Flat-tensor signature around the HF model so the graph takes and returns past/present tensors."""

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__()
        self.model = model
        self.n_layer = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layer):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def io_names(n_layer: int):
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layer):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export(model: GPT2LMHeadModel, path: str, opset: int = 17) -> None:
    model.eval()
    cfg = model.config
    wrapper = CachedGPT2(model).eval()
    hd = cfg.n_embd // cfg.n_head
    b, p, t = 2, 3, 4
    input_ids = torch.randint(1, cfg.vocab_size, (b, t))
    attention_mask = torch.ones(b, p + t, dtype=torch.long)
    position_ids = torch.arange(p, p + t).unsqueeze(0).expand(b, t).contiguous()
    past = []
    for _ in range(cfg.n_layer):
        past += [torch.randn(b, cfg.n_head, p, hd), torch.randn(b, cfg.n_head, p, hd)]
    inputs, outputs = io_names(cfg.n_layer)
    axes = {"input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    with torch.no_grad():
        torch.onnx.export(wrapper, (input_ids, attention_mask, position_ids, *past), path,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, dynamo=False, do_constant_folding=False)


def manifest() -> str:
    n = CONFIG["n_layer"]
    state = "\n".join(f'"present.{i}.{kv}" = "past_key_values.{i}.{kv}"' for i in range(n) for kv in ("key", "value"))
    return f'''family = "decoder"
tasks = ["generate"]
description = "GPT-2 architecture (4 layers, 128 wide) trained on Shakespeare; KV cache in the optimum layout"
max_length = {CONFIG["n_positions"]}
tokenizer = "tokenizer.json"
eos_token_ids = [0]
pad_token_id = 0

[tensors]
input_ids = "input_ids"
attention_mask = "attention_mask"
position_ids = "position_ids"
logits = "logits"

[state]
{state}
'''
