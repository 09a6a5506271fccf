"""tiny-llama: transformers LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, grouped-query attention)
exported with the same optimum tensor names as tiny-gpt2, so the server's decoder binding is
shown to serve a Llama-style export as it is: only the cache shape differs (2 key/value heads
for 4 query heads)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .gpt2 import CachedGPT2, io_names

CONFIG = dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build() -> LlamaForCausalLM:
    # Eager attention keeps the traced graph free of SDPA shortcuts that ignore padding masks.
    return LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager"))


def lm_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def cache_shape():
    """(layers, key/value heads, head size) of the KV cache."""
    return (CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"],
            CONFIG["hidden_size"] // CONFIG["num_attention_heads"])


def export(model: LlamaForCausalLM, path: str, opset: int = 17) -> None:
    model.eval()
    # The flat past/present wrapper only uses the cache API, which Llama shares with GPT-2.
    wrapper = CachedGPT2(model).eval()
    n_layer, kv_heads, hd = cache_shape()
    b, p, t = 2, 3, 4
    input_ids = torch.randint(1, CONFIG["vocab_size"], (b, t))
    attention_mask = torch.ones(b, p + t, dtype=torch.long)
    position_ids = torch.arange(p, p + t).unsqueeze(0).expand(b, t).contiguous()
    past = []
    for _ in range(n_layer):
        past += [torch.randn(b, kv_heads, p, hd), torch.randn(b, kv_heads, p, hd)]
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


def manifest() -> str:
    # No [tensors] or [state] tables: the optimum names are recognised from the graph.
    return f'''family = "decoder"
tasks = ["generate"]
description = "Llama architecture (4 layers, 128 wide, grouped-query attention: 4 query, 2 key/value heads) trained on Shakespeare; optimum tensor names"
max_length = {CONFIG["max_position_embeddings"]}
tokenizer = "tokenizer.json"
eos_token_ids = [0]
pad_token_id = 0
'''
