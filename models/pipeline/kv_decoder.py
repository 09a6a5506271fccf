"""What every Hugging Face causal LM with a KV cache shares here: the training loss, the ONNX export
in the optimum tensor layout (`past_key_values.N.key/value` in, `present.N.key/value` out) and the
manifest. gpt2.py and llama.py (and the benchmark decoder) differ only in the model they build."""
import torch
from transformers import DynamicCache


def lm_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


class CachedDecoder(torch.nn.Module):
    """Flat-tensor signature around the HF model so the graph takes and returns past/present tensors."""

    def __init__(self, model):
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


def export(model, path: str, n_layer: int, kv_heads: int, head_dim: int, opset: int = 17) -> None:
    """Exports with dynamic batch and sequence axes; the cache has `kv_heads` heads of `head_dim`."""
    model.eval()
    wrapper = CachedDecoder(model).eval()
    b, p, t = 2, 3, 4
    input_ids = torch.randint(1, model.config.vocab_size, (b, t))
    attention_mask = torch.ones(b, p + t, dtype=torch.long)
    position_ids = torch.arange(p, p + t).unsqueeze(0).expand(b, t).contiguous()
    past = []
    for _ in range(n_layer):
        past += [torch.randn(b, kv_heads, p, head_dim), torch.randn(b, kv_heads, p, head_dim)]
    inputs, outputs = io_names(n_layer)
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


def manifest(description: str, max_length: int, n_layer: int, name_tables: bool = True) -> str:
    """The model.toml of a decoder in this layout. Without `name_tables` the server recognises the
    optimum names from the graph, as it would for any optimum export."""
    text = f'''family = "decoder"
tasks = ["generate"]
description = "{description}"
max_length = {max_length}
tokenizer = "tokenizer.json"
eos_token_ids = [0]
pad_token_id = 0
'''
    if not name_tables:
        return text
    state = "\n".join(f'"present.{i}.{kv}" = "past_key_values.{i}.{kv}"' for i in range(n_layer) for kv in ("key", "value"))
    return text + f'''
[tensors]
input_ids = "input_ids"
attention_mask = "attention_mask"
position_ids = "position_ids"
logits = "logits"

[state]
{state}
'''
