"""Builds the benchmark-only decoder: GPT-2's architecture at the size of GPT-2 small (12 layers,
768 wide, 12 heads; 89M parameters with the 4096-token Shakespeare vocabulary of tiny-gpt2).

Its weights are random (seeded) and it is never served as a model: it exists so the generation
benchmark can show what the server costs on a decoder whose steps take milliseconds, as
production models' do, next to tiny-gpt2 whose steps take a fraction of one. No model hub is
reachable here, so a pretrained decoder of this size cannot be fetched; for speed, trained and
untrained weights are the same work.

Run by `make bench-models` (the models/ virtual environment): python bench/build_models.py OUT
"""
import os
import shutil
import sys

import onnx
import torch
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "models"))
from pipeline import kv_decoder  # noqa: E402  (the same export as tiny-gpt2)
from pipeline.common import seed_everything  # noqa: E402

NAME = "gpt2-small-untrained"
CONFIG = dict(vocab_size=4096, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
TOKENIZER = os.path.join(HERE, "..", "models", "repository", "tiny-gpt2", "1", "tokenizer.json")


def manifest() -> str:
    return kv_decoder.manifest(
        "GPT-2 small's shape (12 layers, 768 wide) with random weights: for benchmarks only",
        CONFIG["n_positions"], CONFIG["n_layer"])


def main(out_root: str) -> None:
    out = os.path.join(out_root, NAME, "1")
    if os.path.exists(os.path.join(out, "model.toml")):
        print(f"{out} exists")
        return
    os.makedirs(out, exist_ok=True)
    seed_everything()
    model = GPT2LMHeadModel(GPT2Config(**CONFIG, attn_implementation="eager"))
    params = sum(p.numel() for p in model.parameters())
    path = os.path.join(out, "model.onnx")
    head_dim = CONFIG["n_embd"] // CONFIG["n_head"]
    kv_decoder.export(model, path, CONFIG["n_layer"], CONFIG["n_head"], head_dim)
    onnx.checker.check_model(path)
    shutil.copy(TOKENIZER, os.path.join(out, "tokenizer.json"))
    # Written last: a folder without a manifest is an interrupted build and is redone.
    with open(os.path.join(out, "model.toml"), "w", encoding="utf-8") as f:
        f.write(manifest())
    print(f"{NAME}: {params / 1e6:.1f}M parameters, {os.path.getsize(path) / 2**20:.0f} MiB -> {out}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "models"))
