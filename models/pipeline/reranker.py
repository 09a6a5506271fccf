"""tiny-reranker: a BERT cross-encoder that scores how well a passage (a line of Shakespeare)
answers a keyword query, in the folder layout transformers saves (config.json, tokenizer.json)
with its ONNX export.

Why this exists: Classify's text pairs (rerankers, entailment, paraphrase) put both texts in one
input through the tokenizer's pair template, with token type ids 0 for the first and 1 for the
second. A model whose authors trained it that way, a transformers BertForSequenceClassification
with BERT's `[CLS] A [SEP] B [SEP]` template and one relevance logit (as the MS MARCO
cross-encoders have), checks the server against transformers' own text-classification pipeline,
which is what reference.json holds.

What the build does, in order:
  1. data: lines of 6-16 words from the Shakespeare texts the language models read; a query is
     three of a line's words of four letters or more, in random order, and a negative pairs it
     with another line;
  2. tokenizer: a lowercasing WordPiece vocabulary with BERT's normalizer, pre-tokenizer and pair
     template;
  3. model: transformers BertForSequenceClassification (2 layers, hidden 128, one label),
     trained with binary cross-entropy and a fixed step count so a rerun reproduces;
  4. export with torch.onnx (input_ids, attention_mask, token_type_ids -> logits), checked against
     the PyTorch model on padded batches of pairs;
  5. reference.json: transformers' text-classification pipeline on {"text", "text_pair"} inputs,
     whole and truncated (longest first, from the right and from the left).

    python -m pipeline.build_all --cache models/.cache --out models/repository --logs models/logs --only tiny-reranker
"""
import json
import os
import random
import re

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, PreTrainedTokenizerFast, pipeline)

from .common import SEED, TrainLog, seed_everything
from .data import shakespeare_texts
from .export_util import finalize
from .training import _lr_at

NAME = "tiny-reranker"
LABELS = ["relevant"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 6000
MAX_LENGTH = 128
WORD = re.compile(r"[A-Za-z']+")
CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
              max_position_embeddings=MAX_LENGTH, type_vocab_size=2)
# 1e-3 left the model at a constant output for 1,500 steps (loss ln 2); 2e-4 learnt in 800.
STEPS, BATCH, LR, WARMUP = 3000, 64, 3e-4, 100
N_LINES = 60000             # lines used, of 92,347
N_VAL = 1000
LOGIT_TOL = 1e-4
TRUNCATED_LENGTH = 24       # the reference's truncated cases are cut to this many tokens
MANIFEST = """family = "encoder"
tasks = ["classify"]
description = "2-layer BERT cross-encoder (a reranker): scores how well a text_pair (a line of Shakespeare) answers a keyword query (text); {accuracy:.1%} right on held-out queries"
"""


# Pairs the reference scores: each query with the line it was taken from and with another.
REFERENCE_PAIRS = [
    ("parting sorrow night", "Good night, good night! parting is such sweet sorrow,"),
    ("parting sorrow night", "Now is the winter of our discontent"),
    ("question", "To be, or not to be: that is the question:"),
    ("winter discontent", "Now is the winter of our discontent"),
    ("winter discontent", "To be, or not to be: that is the question:"),
    ("horse kingdom", "A horse! a horse! my kingdom for a horse!"),
    ("horse kingdom", "All the world's a stage,"),
    ("world stage players", "All the world's a stage, And all the men and women merely players;"),
]
# A long pair for truncation: the passage is the longer, so it is cut first.
LONG_PAIR = ("players exits entrances",
             "All the world's a stage, And all the men and women merely players; They have their "
             "exits and their entrances, And one man in his time plays many parts, His acts being "
             "seven ages.")


def lines_of(texts):
    return [line.strip() for text in texts for line in text.split("\n")
            if 6 <= len(WORD.findall(line)) <= 16]


def query_of(line, rng):
    words = [word.lower() for word in WORD.findall(line) if len(word) >= 4]
    return " ".join(rng.sample(words, min(3, len(words))))


def labelled(lines, rng):
    """Each line's query with the line (1) and with another line (0)."""
    rows = []
    for i, line in enumerate(lines):
        query = query_of(line, rng)
        if query:
            rows.append((query, line, 1))
            rows.append((query, lines[(i + 1 + rng.randrange(len(lines) - 1)) % len(lines)], 0))
    rng.shuffle(rows)
    return rows


def train_tokenizer(texts) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def encode(tok, rows):
    """Right-padded ids, mask and token types of (query, passage, label) rows, cut to MAX_LENGTH."""
    tok.enable_truncation(MAX_LENGTH)
    encodings = tok.encode_batch([(q, p) for q, p, _ in rows])
    tok.no_truncation()
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(rows), width), np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for r, e in enumerate(encodings):
        ids[r, :len(e.ids)] = e.ids
        types[r, :len(e.ids)] = e.type_ids
        mask[r, :len(e.ids)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)


def logits_of(model, tok, rows):
    ids, mask, types = encode(tok, rows)
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


@torch.no_grad()
def accuracy(model, tok, rows, batch=100):
    model.eval()
    right = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        predicted = (logits_of(model, tok, chunk)[:, 0] > 0).long()
        right += int((predicted == torch.tensor([y for _, _, y in chunk])).sum())
    model.train()
    return right / len(rows)


def train(model, tok, train_rows, val_rows, log, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    log(f"params={sum(p.numel() for p in model.parameters())} steps={steps} batch={BATCH} lr={LR} "
        f"train={len(train_rows)} val={len(val_rows)}")
    model.train()
    running, stats = 0.0, {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, LR, WARMUP)
        start = (step * BATCH) % (len(train_rows) - BATCH)
        chunk = train_rows[start:start + BATCH]
        loss = F.binary_cross_entropy_with_logits(
            logits_of(model, tok, chunk)[:, 0], torch.tensor([float(y) for _, _, y in chunk]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % 100 == 0:
            stats["train_loss"] = running / 100
            running = 0.0
            log(f"step {step + 1} train_loss {stats['train_loss']:.4f}")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            stats["val_accuracy"] = accuracy(model, tok, val_rows)
            log(f"step {step + 1} held-out accuracy {stats['val_accuracy']:.4f}")
    model.eval()
    return stats


class Logits(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


def export(model, tok, rows, path):
    ids, mask, types = encode(tok, rows[:3])
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "token_type_ids")}
    axes["logits"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(Logits(model), (ids, mask, types), path,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=18, dynamo=True,
                          external_data=False)


def check_export(model, tok, path, rows):
    """The ONNX graph's logits equal PyTorch's on padded batches of pairs."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for start in range(0, len(rows), 16):
        ids, mask, types = encode(tok, rows[start:start + 16])
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                       "token_type_ids": types.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > LOGIT_TOL:
        raise SystemExit(f"{NAME}: ONNX logits differ from PyTorch by {worst}")
    print(f"{NAME}: export parity ok (max diff {worst:.2e})")
    return worst


def reference(folder):
    """transformers' own pipeline over the saved folder (PyTorch weights, the fast tokenizer)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None, device="cpu")

    def scores(query, passage, **tokenizer_kwargs):
        ranked = classify({"text": query, "text_pair": passage}, **tokenizer_kwargs)
        by_label = {entry["label"]: entry["score"] for entry in ranked}
        return [by_label[label] for label in LABELS]

    cases = [{"text": q, "text_pair": p, "probabilities": scores(q, p),
              "token_count": len(tokenizer(q, p)["input_ids"])} for q, p in REFERENCE_PAIRS]
    truncated = []
    query, passage = LONG_PAIR
    for side in ("right", "left"):
        tokenizer.truncation_side = side
        encoded = tokenizer(query, passage, truncation=True, max_length=TRUNCATED_LENGTH)
        truncated.append({"text": query, "text_pair": passage, "side": side, "max_length": TRUNCATED_LENGTH,
                          "input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"],
                          "probabilities": scores(query, passage, truncation=True, max_length=TRUNCATED_LENGTH)})
    tokenizer.truncation_side = "right"
    return {"model": NAME, "labels": LABELS, "cases": cases, "truncated": truncated}


def build(args, summary):
    rng = random.Random(SEED)
    lines = lines_of(shakespeare_texts(args.cache))
    rng.shuffle(lines)
    lines = lines[:N_LINES]
    tok = train_tokenizer(lines)
    rows = labelled(lines, rng)
    val_rows, train_rows = rows[:N_VAL], rows[N_VAL:]
    seed_everything()
    config = BertConfig(vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={label: i for i, label in enumerate(LABELS)}, **CONFIG)
    model = BertForSequenceClassification(config)
    log = TrainLog(os.path.join(args.logs, f"{NAME}.log"))
    stats = train(model, tok, train_rows, val_rows, log, max(1, int(STEPS * args.scale)))
    log.close()

    d = os.path.join(args.out, NAME, "1")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", model_max_length=MAX_LENGTH,
        # BERT's inputs: without token_type_ids here, transformers would give the model none.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"]).save_pretrained(d)
    path = os.path.join(d, "model.onnx")
    export(model, tok, val_rows, path)
    size = finalize(path)
    stats["export_max_diff"] = check_export(model, tok, path, val_rows[:64])
    # config.json, and the weights the reference loads as a user of transformers would; the
    # weights are not kept (the server runs the ONNX graph).
    model.save_pretrained(d)
    ref = reference(d)
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(d, "model.toml"), "w", encoding="utf-8") as f:
        f.write(MANIFEST.format(accuracy=stats["val_accuracy"]))
    stats.update(size=size, n_train=len(train_rows), n_val=len(val_rows))
    summary[NAME] = stats
