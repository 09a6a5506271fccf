"""Attention masks built inside the exported graphs."""
import torch

# A finite large negative: a query whose keys are all padding still gets a finite softmax instead of NaN.
NEG = -1e4


def additive_mask(attention_mask: torch.Tensor, nhead: int, causal: bool) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B*nhead, T, T] float mask for nn.MultiheadAttention."""
    t = attention_mask.shape[1]
    keys = attention_mask[:, None, :].to(torch.bool)
    if causal:
        idx = torch.arange(t, device=attention_mask.device)
        allowed = keys & (idx[None, :] <= idx[:, None])[None]
    else:
        allowed = keys.expand(-1, t, -1)
    add = (1.0 - allowed.to(torch.float32)) * NEG
    return add.repeat_interleave(nhead, dim=0)


class Gelu(torch.nn.Module):
    # A plain module (not nn.GELU) keeps nn.TransformerEncoderLayer off its fused fast path, which has no ONNX export.
    def forward(self, x):
        return torch.nn.functional.gelu(x)
