"""Reference outputs from onnxruntime, cross-checked against the PyTorch modules.

Any disagreement beyond the tolerances raises, so build.sh fails instead of shipping a broken export.
"""
import numpy as np
import onnxruntime as ort
import torch

LOGIT_TOL = 1e-3
PROB_TOL = 1e-4

GEN_PROMPTS = ["To be, or not to be", "ROMEO.", "My lord,", "What light through yonder window breaks",
               "KING HENRY.\nOnce more unto the breach"]
BATCH_PROMPTS = ["ROMEO.", "My lord, the queen", "What light through yonder window breaks"]
EMBED_TEXTS = ["The king is dead; long live the king.", "O Romeo, Romeo, wherefore art thou Romeo?",
               "Cheap meds online, limited offer, click now!", "The meeting moved to Thursday at 10am.",
               "Love looks not with the eyes, but with the mind."]
CLASSIFY_TEXTS = [
    "Subject: URGENT: you have WON $1,000,000!!!\nClick here now to claim your FREE prize. Limited time offer, act now! Reply with your bank details.",
    "Subject: Re: patch for the build script\nThanks, I applied your patch and the tests pass now. Can you also update the README before we release?",
    "Subject: Lose 30 pounds in 30 days\nOur amazing new diet pill is guaranteed to work or your money back. Order today and get a second bottle FREE! To unsubscribe click here.",
    "Subject: Re: lunch tomorrow?\nSure, let's meet at noon at the usual place. I'll bring the notes from yesterday's meeting.",
    "Subject: Make money fast from home\nDear friend, earn $5000 a week working from home. No experience needed. Visit our website and sign up today!",
    "Subject: Re: [SAtalk] new rules for the spam filter\nI ran the new rules against my mail archive last night; the false positive rate looks fine.",
]


class ParityError(SystemExit):
    pass


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _left_pad(seqs, pad=0):
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask


# ---- onnxruntime generation, one session run per step for the whole batch ----

def ort_generate_kv(sess, prompts, n_new, n_layer, n_head, head_dim):
    ids, mask = _left_pad(prompts)
    pos = np.clip(mask.cumsum(1) - 1, 0, None).astype(np.int64)
    b = len(prompts)
    past = {}
    for i in range(n_layer):
        for kv in ("key", "value"):
            past[f"past_key_values.{i}.{kv}"] = np.zeros((b, n_head, 0, head_dim), dtype=np.float32)
    out_names = [o.name for o in sess.get_outputs()]
    gen, step_logits = [[] for _ in prompts], []
    for _ in range(n_new):
        outs = dict(zip(out_names, sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})))
        last = outs["logits"][:, -1, :]
        step_logits.append(last)
        nxt = last.argmax(-1)
        for i in range(b):
            gen[i].append(int(nxt[i]))
        past = {f"past_key_values.{k[len('present.'):]}": v for k, v in outs.items() if k.startswith("present.")}
        ids = nxt[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
    return gen, step_logits


def ort_generate_full(sess, prompts, n_new):
    seqs = [list(p) for p in prompts]
    gen, step_logits = [[] for _ in prompts], []
    for _ in range(n_new):
        ids, mask = _left_pad(seqs)
        pos = np.clip(mask.cumsum(1) - 1, 0, None).astype(np.int64)
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos})[0]
        last = logits[:, -1, :]
        step_logits.append(last)
        for i, t in enumerate(last.argmax(-1)):
            gen[i].append(int(t))
            seqs[i].append(int(t))
    return gen, step_logits


def ort_generate_rnn(sess, prompts, n_new, layers, hidden):
    # Prompts of different lengths are prefilled one by one, then the decode steps run batched.
    hs, cs, lasts = [], [], []
    for p in prompts:
        z = np.zeros((1, layers, hidden), dtype=np.float32)
        logits, h, c = sess.run(["logits", "hn", "cn"], {"input_ids": np.array([p], dtype=np.int64), "h0": z, "c0": z})
        hs.append(h), cs.append(c), lasts.append(logits[:, -1, :])
    h, c, last = np.concatenate(hs), np.concatenate(cs), np.concatenate(lasts)
    gen, step_logits = [[] for _ in prompts], []
    for step in range(n_new):
        step_logits.append(last)
        nxt = last.argmax(-1)
        for i in range(len(prompts)):
            gen[i].append(int(nxt[i]))
        if step + 1 == n_new:
            break
        logits, h, c = sess.run(["logits", "hn", "cn"], {"input_ids": nxt[:, None].astype(np.int64), "h0": h, "c0": c})
        last = logits[:, -1, :]
    return gen, step_logits


@torch.no_grad()
def torch_generate(full_logits, prompt, n_new):
    seq = list(prompt)
    gen, step_logits = [], []
    for _ in range(n_new):
        last = full_logits(torch.tensor([seq]))[0, -1].numpy()
        step_logits.append(last)
        t = int(last.argmax())
        gen.append(t)
        seq.append(t)
    return gen, step_logits


def generate_reference(name, tok, ort_gen, full_logits, n_new=24):
    """ort_gen(prompts: list[list[int]]) -> (greedy ids per prompt, per-step logits [B, V])."""
    cases, worst = [], 0.0
    single = {}
    for prompt in GEN_PROMPTS + [p for p in BATCH_PROMPTS if p not in GEN_PROMPTS]:
        ids = tok.encode(prompt).ids
        o_gen, o_logits = ort_gen([ids])
        t_gen, t_logits = torch_generate(full_logits, ids, n_new)
        diff = max(float(np.abs(o[0] - t).max()) for o, t in zip(o_logits, t_logits))
        worst = max(worst, diff)
        if diff > LOGIT_TOL:
            raise ParityError(f"{name}: logits differ from PyTorch by {diff} on {prompt!r}")
        if o_gen[0] != t_gen:
            raise ParityError(f"{name}: greedy ids differ from PyTorch on {prompt!r}: {o_gen[0]} vs {t_gen}")
        single[prompt] = o_gen[0]
        if prompt not in GEN_PROMPTS:
            continue
        first = o_logits[0][0]
        top = np.argsort(-first, kind="stable")[:5]
        cases.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": o_gen[0],
                      "greedy_text": tok.decode(o_gen[0], skip_special_tokens=False),
                      "first_step_top5": [{"id": int(i), "logit": float(first[i])} for i in top]})
    b_gen, _ = ort_gen([tok.encode(p).ids for p in BATCH_PROMPTS])
    for p, g in zip(BATCH_PROMPTS, b_gen):
        if g != single[p]:
            raise ParityError(f"{name}: batched greedy ids differ from single-prompt ids for {p!r}: {g} vs {single[p]}")
    print(f"{name}: generate parity ok (max logit diff {worst:.2e}), batch of {len(BATCH_PROMPTS)} matches")
    return {"max_new_tokens": n_new, "cases": cases, "batch": {"prompts": BATCH_PROMPTS, "greedy_ids": b_gen}}


def _pool(h, mask):
    m = mask[..., None].astype(np.float32)
    v = (h * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def embed_reference(name, tok, sess, torch_hidden, texts=EMBED_TEXTS, with_mask=True):
    cases = []
    worst = 0.0
    for text in texts:
        ids = tok.encode(text).ids
        arr = np.array([ids], dtype=np.int64)
        mask = np.ones_like(arr)
        feed = {"input_ids": arr}
        if with_mask:
            feed["attention_mask"] = mask
        h = sess.run(["last_hidden_state"], feed)[0]
        emb = _pool(h, mask)[0]
        with torch.no_grad():
            th = torch_hidden(torch.from_numpy(arr), torch.from_numpy(mask)).numpy()
        diff = float(np.abs(_pool(th, mask)[0] - emb).max())
        worst = max(worst, diff)
        if diff > PROB_TOL:
            raise ParityError(f"{name}: embedding differs from PyTorch by {diff} on {text!r}")
        cases.append({"text": text, "ids": ids, "embedding": [float(x) for x in emb]})
    # A padded batch must pool to the same vectors as single texts.
    if with_mask:
        seqs = [c["ids"] for c in cases]
        t = max(len(s) for s in seqs)
        arr = np.zeros((len(seqs), t), dtype=np.int64)
        mask = np.zeros_like(arr)
        for i, s in enumerate(seqs):
            arr[i, :len(s)], mask[i, :len(s)] = s, 1
        h = sess.run(["last_hidden_state"], {"input_ids": arr, "attention_mask": mask})[0]
        for c, e in zip(cases, _pool(h, mask)):
            d = float(np.abs(np.array(c["embedding"]) - e).max())
            if d > PROB_TOL:
                raise ParityError(f"{name}: padded batch embedding differs by {d} on {c['text']!r}")
    print(f"{name}: embed parity ok (max diff {worst:.2e})")
    return {"pooling": "mean", "normalize": True, "cases": cases}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def classify_reference(name, tok, sess, torch_logits, labels, max_len, texts=CLASSIFY_TEXTS):
    cases, worst = [], 0.0
    for text in texts:
        ids = tok.encode(text).ids[:max_len]
        arr = np.array([ids], dtype=np.int64)
        mask = np.ones_like(arr)
        probs = _softmax(sess.run(["logits"], {"input_ids": arr, "attention_mask": mask})[0])[0]
        with torch.no_grad():
            tp = _softmax(torch_logits(torch.from_numpy(arr), torch.from_numpy(mask)).numpy())[0]
        diff = float(np.abs(tp - probs).max())
        worst = max(worst, diff)
        if diff > PROB_TOL:
            raise ParityError(f"{name}: probabilities differ from PyTorch by {diff} on {text!r}")
        cases.append({"text": text, "probabilities": [float(p) for p in probs]})
    print(f"{name}: classify parity ok (max diff {worst:.2e})")
    return {"labels": labels, "cases": cases}
