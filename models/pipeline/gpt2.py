"""tiny-gpt2: transformers GPT2LMHeadModel with a KV cache in the optimum tensor layout."""
from transformers import GPT2Config, GPT2LMHeadModel

from . import kv_decoder
from .kv_decoder import lm_loss  # noqa: F401  (build_all takes each model's loss from its module)

CONFIG = dict(vocab_size=4096, n_positions=256, n_embd=128, n_layer=4, n_head=4,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build() -> GPT2LMHeadModel:
    # Eager attention keeps the traced graph free of SDPA shortcuts that ignore padding masks.
    cfg = GPT2Config(**CONFIG, attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


def cache_shape():
    """(layers, key/value heads, head size) of the KV cache."""
    return CONFIG["n_layer"], CONFIG["n_head"], CONFIG["n_embd"] // CONFIG["n_head"]


def export(model: GPT2LMHeadModel, path: str) -> None:
    kv_decoder.export(model, path, *cache_shape())


def manifest() -> str:
    return kv_decoder.manifest(
        "GPT-2 architecture (4 layers, 128 wide) trained on Shakespeare; KV cache in the optimum layout",
        CONFIG["n_positions"], CONFIG["n_layer"])
