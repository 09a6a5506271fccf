"""Training loops (CPU, fixed step counts so reruns give the same weights)."""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .common import SEED, TrainLog


def _lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _windows(stream, starts, seq):
    x = np.stack([stream[s:s + seq] for s in starts])
    y = np.stack([stream[s + 1:s + seq + 1] for s in starts])
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def lm_val_loss(model, loss_fn, val, seq, batch=16, batches=6):
    model.eval()
    n = batch * batches
    starts = np.linspace(0, len(val) - seq - 2, n).astype(np.int64)
    total = 0.0
    for i in range(batches):
        x, y = _windows(val, starts[i * batch:(i + 1) * batch], seq)
        total += float(loss_fn(model, x, y))
    model.train()
    return total / batches


def train_lm(model, loss_fn, train, val, log: TrainLog, steps, batch, seq, lr, warmup=100, log_every=25,
             val_every=200):
    rng = np.random.RandomState(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params={n_params} steps={steps} batch={batch} seq={seq} lr={lr} train_tokens={len(train)} val_tokens={len(val)}")
    model.train()
    run = 0.0
    t0 = time.time()
    stats = {"train_loss": float("nan")}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        x, y = _windows(train, rng.randint(0, len(train) - seq - 1, batch), seq)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run += loss.item()
        if (step + 1) % log_every == 0:
            stats["train_loss"] = run / log_every
            log(f"step {step + 1} train_loss {run / log_every:.4f} lr {opt.param_groups[0]['lr']:.2e}")
            run = 0.0
        if (step + 1) % val_every == 0 or step + 1 == steps:
            stats["val_loss"] = lm_val_loss(model, loss_fn, val, seq)
            log(f"step {step + 1} val_loss {stats['val_loss']:.4f}")
    stats["seconds"] = time.time() - t0
    stats["steps"] = steps
    stats["params"] = n_params
    log(f"done in {stats['seconds']:.0f}s final train_loss {stats['train_loss']:.4f} val_loss {stats['val_loss']:.4f}")
    model.eval()
    return stats


def _pad(seqs, pad=0):
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def classifier_eval(model, seqs, labels, batch=64):
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(seqs), batch):
        ids, mask = _pad(seqs[i:i + batch])
        y = torch.tensor(labels[i:i + batch])
        logits = model(ids, mask)[1]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train()
    return loss / len(seqs), correct / len(seqs)


def train_classifier(model, train_seqs, train_labels, val_seqs, val_labels, log: TrainLog, steps, batch, lr,
                     warmup=50, log_every=25, val_every=150):
    rng = np.random.RandomState(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params={n_params} steps={steps} batch={batch} lr={lr} train={len(train_seqs)} val={len(val_seqs)} "
        f"train_spam={sum(train_labels)} val_spam={sum(val_labels)}")
    model.train()
    run, t0, stats = 0.0, time.time(), {"train_loss": float("nan")}
    order = rng.permutation(len(train_seqs))
    pos = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        if pos + batch > len(order):
            order, pos = rng.permutation(len(train_seqs)), 0
        idx = order[pos:pos + batch]
        pos += batch
        ids, mask = _pad([train_seqs[i] for i in idx])
        y = torch.tensor([train_labels[i] for i in idx])
        loss = F.cross_entropy(model(ids, mask)[1], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run += loss.item()
        if (step + 1) % log_every == 0:
            stats["train_loss"] = run / log_every
            log(f"step {step + 1} train_loss {run / log_every:.4f}")
            run = 0.0
        if (step + 1) % val_every == 0 or step + 1 == steps:
            stats["val_loss"], stats["val_accuracy"] = classifier_eval(model, val_seqs, val_labels)
            log(f"step {step + 1} val_loss {stats['val_loss']:.4f} val_accuracy {stats['val_accuracy']:.4f}")
    stats.update(seconds=time.time() - t0, steps=steps, params=n_params)
    log(f"done in {stats['seconds']:.0f}s final train_loss {stats['train_loss']:.4f} val_loss {stats['val_loss']:.4f} "
        f"held-out accuracy {stats['val_accuracy']:.4f}")
    model.eval()
    return stats


def skipgram_pairs(sentences, counts, window, subsample, rng):
    """Center/context pairs with word2vec's frequent-word subsampling and random window shrinking."""
    total = counts.sum()
    freq = counts / total
    keep_p = np.minimum(1.0, np.sqrt(subsample / np.maximum(freq, 1e-12)) + subsample / np.maximum(freq, 1e-12))
    centers, contexts = [], []
    for s in sentences:
        s = s[rng.random_sample(len(s)) < keep_p[s]]
        n = len(s)
        if n < 2:
            continue
        spans = rng.randint(1, window + 1, n)
        for off in range(1, window + 1):
            ok = spans[: n - off] >= off
            a, b = s[: n - off][ok], s[off:][ok]
            centers += [a, b]
            contexts += [b, a]
    return np.concatenate(centers), np.concatenate(contexts)


def train_skipgram(model, centers, contexts, counts, log: TrainLog, steps, batch, negatives, lr):
    rng = np.random.RandomState(SEED)
    noise = counts.astype(np.float64) ** 0.75
    noise[:2] = 0.0  # never sample <pad> or [UNK] as negatives
    noise = torch.tensor(noise / noise.sum())
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.SparseAdam(list(model.parameters()), lr=lr)
    log(f"pairs={len(centers)} steps={steps} batch={batch} negatives={negatives} lr={lr}")
    order = rng.permutation(len(centers))
    pos, run, t0, stats = 0, 0.0, time.time(), {"train_loss": float("nan")}
    c_t, x_t = torch.from_numpy(centers), torch.from_numpy(contexts)
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(centers)), 0
        idx = torch.from_numpy(order[pos:pos + batch])
        pos += batch
        neg = torch.multinomial(noise, batch * negatives, replacement=True, generator=gen).view(batch, negatives)
        loss = model.loss(c_t[idx], x_t[idx], neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run += loss.item()
        if (step + 1) % 250 == 0:
            stats["train_loss"] = run / 250
            log(f"step {step + 1} train_loss {run / 250:.4f} epoch {(step + 1) * batch / len(centers):.2f}")
            run = 0.0
    stats.update(seconds=time.time() - t0, steps=steps)
    log(f"done in {stats['seconds']:.0f}s final train_loss {stats['train_loss']:.4f}")
    return stats
