"""tiny-word2vec: skip-gram with negative sampling over Shakespeare words."""
import torch
import torch.nn.functional as F
from torch import nn

CONFIG = dict(vocab_size=8000, dim=64, window=5, negatives=5, subsample=1e-4)


class SkipGram(nn.Module):
    def __init__(self, vocab_size, dim):
        super().__init__()
        self.inp = nn.Embedding(vocab_size, dim, sparse=True)
        self.out = nn.Embedding(vocab_size, dim, sparse=True)
        nn.init.uniform_(self.inp.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.out.weight)

    def loss(self, center, context, negatives):
        u = self.inp(center)
        pos = (u * self.out(context)).sum(-1)
        neg = torch.bmm(self.out(negatives), u.unsqueeze(-1)).squeeze(-1)
        return -(F.logsigmoid(pos).mean() + F.logsigmoid(-neg).sum(-1).mean())


class Lookup(nn.Module):
    """The exported graph is only the input-embedding lookup; pooling happens in the server."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(weight.detach().clone(), freeze=True)

    def forward(self, input_ids):
        return self.emb(input_ids)


def export(lookup: Lookup, path: str, opset: int = 17) -> None:
    lookup.eval()
    ids = torch.randint(2, CONFIG["vocab_size"], (2, 5))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"}}
    with torch.no_grad():
        torch.onnx.export(lookup, (ids,), path, input_names=["input_ids"], output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def manifest() -> str:
    return '''family = "encoder"
tasks = ["embed"]
description = "64-d skip-gram word vectors (negative sampling) trained on Shakespeare; mean of word vectors"
max_length = 256
tokenizer = "tokenizer.json"
pad_token_id = 0

[tensors]
input_ids = "input_ids"
hidden_states = "last_hidden_state"

[embed]
pooling = "mean"
normalize = true
'''
