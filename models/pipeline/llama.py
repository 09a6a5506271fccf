"""tiny-llama: transformers LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, grouped-query attention)
exported with the same optimum tensor names as tiny-gpt2, so the server's decoder binding is
shown to serve a Llama-style export as it is: only the cache shape differs (2 key/value heads
for 4 query heads)."""
from transformers import LlamaConfig, LlamaForCausalLM

from . import kv_decoder
from .kv_decoder import lm_loss  # noqa: F401  (build_all takes each model's loss from its module)

CONFIG = dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build() -> LlamaForCausalLM:
    # Eager attention keeps the traced graph free of SDPA shortcuts that ignore padding masks.
    return LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager"))


def cache_shape():
    """(layers, key/value heads, head size) of the KV cache."""
    return (CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"],
            CONFIG["hidden_size"] // CONFIG["num_attention_heads"])


def export(model: LlamaForCausalLM, path: str) -> None:
    kv_decoder.export(model, path, *cache_shape())


def manifest() -> str:
    # No [tensors] or [state] tables: the optimum names are recognised from the graph.
    return kv_decoder.manifest(
        "Llama architecture (4 layers, 128 wide, grouped-query attention: 4 query, 2 key/value heads) "
        "trained on Shakespeare; optimum tensor names",
        CONFIG["max_position_embeddings"], CONFIG["num_hidden_layers"], name_tables=False)
