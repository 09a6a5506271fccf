"""tiny-transformer-lm: decoder-only LM from nn.TransformerEncoder with a causal + key-padding mask."""
import torch
import torch.nn.functional as F
from torch import nn

from .masks import Gelu, additive_mask

CONFIG = dict(vocab_size=4096, d_model=128, nhead=4, layers=3, ff=512, max_len=256, dropout=0.1)


class TransformerLM(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, layers, ff, max_len, dropout):
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

    def forward(self, input_ids, attention_mask, position_ids):
        x = self.drop(self.tok(input_ids) + self.pos(position_ids))
        h = self.blocks(x, mask=additive_mask(attention_mask, self.nhead, causal=True))
        return F.linear(h, self.tok.weight)


def build() -> TransformerLM:
    return TransformerLM(**CONFIG)


def _plain_inputs(x):
    b, t = x.shape
    return torch.ones_like(x), torch.arange(t).unsqueeze(0).expand(b, t)


def lm_loss(model, x, y):
    logits = model(x, *_plain_inputs(x))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def full_logits(model, ids):
    return model(ids, *_plain_inputs(ids))


def export(model: TransformerLM, path: str, opset: int = 18) -> None:
    # The TorchScript exporter bakes the sequence length into nn.MultiheadAttention reshapes; torch.export keeps it symbolic.
    model.eval()
    ids = torch.randint(1, CONFIG["vocab_size"], (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "position_ids", "logits")}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask, pos), path,
                          input_names=["input_ids", "attention_mask", "position_ids"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=True, external_data=False)


def manifest() -> str:
    return f'''family = "decoder"
tasks = ["generate"]
description = "decoder-only transformer (3 layers, 128 wide, nn.TransformerEncoder + causal mask) trained on Shakespeare; no cache"
max_length = {CONFIG["max_len"]}
tokenizer = "tokenizer.json"
eos_token_ids = [0]
pad_token_id = 0

[tensors]
input_ids = "input_ids"
attention_mask = "attention_mask"
position_ids = "position_ids"
logits = "logits"
'''
