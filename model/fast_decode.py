"""The model prepared for decoding on a CPU: a copy whose linear layers are laid out for products with few rows."""
import copy

import torch
from torch import nn

from .model import FeedForward


class SkinnyLinear(nn.Module):
    """The product of nn.Linear layers (no bias, outputs side by side) for inference, with the weights in two
    layouts. MKL picks its kernel by the shape of the output. With one to three rows, x @ W(in, out) streams the
    weight fastest, and splitting its columns into two halves multiplied as one batched product lets both cores
    stream their half (MKL runs a skinny product on one thread): about 1.2x faster on a 2-core CPU. From four
    rows on, W(out, in) @ x.T keeps the long dimension first and runs about 1.3x faster. All are exact products;
    they differ only in summation order. Both layouts are copies, taken now."""

    def __init__(self, *linears):
        super().__init__()
        self.out_in = torch.cat([m.weight.detach() for m in linears]).contiguous()
        n_out, self.n_in = self.out_in.shape
        self.halves = 2 if n_out % 2 == 0 else 1
        # (halves, in, out / halves): half h holds output columns h * out / halves onwards
        self.in_out = self.out_in.t().reshape(self.n_in, self.halves, -1).transpose(0, 1).contiguous()

    def forward(self, x):
        rows = x.reshape(-1, self.n_in)
        n = rows.shape[0]
        if n < 4:
            y = torch.bmm(rows.expand(self.halves, n, self.n_in), self.in_out)  # (halves, n, out / halves)
            y = y.transpose(0, 1).reshape(n, -1)
        else:
            y = (self.out_in @ rows.t()).t().contiguous()  # row-major again, as the kernels after it expect
        return y.view(*x.shape[:-1], -1)


def copy_tree(module):
    """A copy of a module tree that shares the original's parameters, buffers and code: a module swapped in the
    copy leaves the original as it was."""
    clone = copy.copy(module)
    clone._modules = {name: child if child is None else copy_tree(child) for name, child in module._modules.items()}
    return clone


def decode_model(model):
    """A copy of the model for decode steps (a few rows of one token each): q|k|v and gate|up fused, and every
    product a SkinnyLinear. It runs the model's own forward over copies of the weights: prepare it again after
    they change."""
    fast = copy_tree(model.eval())
    for layer in fast.layers:
        a, ff = layer.attention, layer.feed_forward
        a.wqkv, a.wo = SkinnyLinear(a.wq, a.wk, a.wv), SkinnyLinear(a.wo)
        if isinstance(ff, FeedForward):  # experts run as they are: no two copies of every expert
            ff.w13, ff.w2 = SkinnyLinear(ff.w1, ff.w3), SkinnyLinear(ff.w2)
    fast.output = SkinnyLinear(fast.output)
    return fast
