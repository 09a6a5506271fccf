"""tiny-encoder: nn.TransformerEncoder text encoder trained as a ham/spam classifier."""
import torch
from torch import nn

from .masks import Gelu, additive_mask

LABELS = ["ham", "spam"]
CONFIG = dict(vocab_size=4096, d_model=128, nhead=4, layers=2, ff=256, max_len=256, dropout=0.1, n_labels=2)


def mean_pool(h, attention_mask):
    m = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class Encoder(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, layers, ff, max_len, dropout, n_labels):
        super().__init__()
        self.nhead = nhead
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout, activation=Gelu(),
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        # GPT-2 style small init: unit-variance embeddings tied to the head give logits in the hundreds.
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.head = nn.Linear(d_model, n_labels)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
        x = self.drop(self.tok(input_ids) + self.pos(pos))
        h = self.blocks(x, mask=additive_mask(attention_mask, self.nhead, causal=False))
        logits = self.head(self.drop(mean_pool(h, attention_mask)))
        return h, logits


def build() -> Encoder:
    return Encoder(**CONFIG)


def export(model: Encoder, path: str, opset: int = 18) -> None:
    # The TorchScript exporter bakes the sequence length into nn.MultiheadAttention reshapes; torch.export keeps it symbolic.
    model.eval()
    ids = torch.randint(1, CONFIG["vocab_size"], (2, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), path, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state", "logits"], dynamic_axes=axes,
                          opset_version=opset, dynamo=True, external_data=False)


def manifest() -> str:
    return f'''family = "encoder"
tasks = ["embed", "classify"]
description = "2-layer transformer encoder trained as a ham/spam classifier on the SpamAssassin corpus"
max_length = {CONFIG["max_len"]}
tokenizer = "tokenizer.json"
pad_token_id = 0

[tensors]
input_ids = "input_ids"
attention_mask = "attention_mask"
logits = "logits"
hidden_states = "last_hidden_state"

[embed]
pooling = "mean"
normalize = true

[classify]
labels = ["ham", "spam"]
multi_label = false
'''
