"""tiny-lstm: two-layer LSTM language model with the output layer tied to the input embedding."""
import torch
import torch.nn.functional as F
from torch import nn

CONFIG = dict(vocab_size=4096, emb=128, hidden=256, layers=2, dropout=0.1)


class LSTMLM(nn.Module):
    def __init__(self, vocab_size, emb, hidden, layers, dropout):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, emb)
        self.lstm = nn.LSTM(emb, hidden, layers, batch_first=True, dropout=dropout)
        # Projecting back to the embedding width lets the head share the embedding matrix (keeps the file < 6 MB).
        self.proj = nn.Linear(hidden, emb)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids, state=None):
        y, (h, c) = self.lstm(self.drop(self.emb(input_ids)), state)
        logits = F.linear(self.proj(self.drop(y)), self.emb.weight, self.out_bias)
        return logits, h, c


def build() -> LSTMLM:
    return LSTMLM(**CONFIG)


def lm_loss(model, x, y):
    logits = model(x)[0]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[0]


class BatchFirstState(nn.Module):
    """The server treats axis 0 of every state tensor as batch, so the graph takes [B, L, H] state."""

    def __init__(self, model: LSTMLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, h0, c0):
        state = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())
        logits, h, c = self.model(input_ids, state)
        return logits, h.transpose(0, 1), c.transpose(0, 1)


def export(model: LSTMLM, path: str, opset: int = 17) -> None:
    model.eval()
    wrapper = BatchFirstState(model).eval()
    b, t = 2, 5
    ids = torch.randint(1, CONFIG["vocab_size"], (b, t))
    h0 = torch.zeros(b, CONFIG["layers"], CONFIG["hidden"])
    c0 = torch.zeros(b, CONFIG["layers"], CONFIG["hidden"])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "h0": {0: "batch"}, "c0": {0: "batch"},
            "logits": {0: "batch", 1: "sequence"}, "hn": {0: "batch"}, "cn": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(wrapper, (ids, h0, c0), path, input_names=["input_ids", "h0", "c0"],
                          output_names=["logits", "hn", "cn"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=False)


def manifest() -> str:
    return f'''family = "rnn"
tasks = ["generate"]
description = "2-layer LSTM language model (emb 128, hidden 256) trained on Shakespeare"
max_length = 256
tokenizer = "tokenizer.json"
eos_token_ids = [0]
pad_token_id = 0

[tensors]
input_ids = "input_ids"
logits = "logits"

[state]
hn = "h0"
cn = "c0"
'''
