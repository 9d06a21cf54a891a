"""
The fused rank-1 LoRA CUDA ops (csrc/), built on first import and called through torch.ops.

    import lora_cuda                                  # JIT build (~/.cache/torch_extensions)
    y, u = lora_cuda.lora_linear(x, W, bias, A, B, s) # same contract as lora.lora_linear_ref

lora.py imports this only when CUDA is available and LORA_IMPL is not `ref`; if the build fails it
prints a warning and keeps the PyTorch reference path. Registered here, following the custom-op
tutorial: fake implementations (so torch.compile can trace the ops) and autograd for
rank1::lora1_linear, whose backward calls the registered rank1::lora1_linear_backward op, and
an autocast kernel (x, W and bias in the autocast dtype; a, b and u stay fp32).
"""
import os

import torch
from torch.utils.cpp_extension import load

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(CSRC, "lora1.cpp"), os.path.join(CSRC, "lora1_cuda.cu")]

load(name="rank1_lora1", sources=SOURCES, is_python_module=False, verbose=False,
     extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])


@torch.library.register_fake("rank1::lora1_linear")
def _(x, W, bias, a, b, s):
    return x.new_empty(x.shape[0], W.shape[0]), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.register_fake("rank1::lora1_linear_backward")
def _(g, x, W, u, a, b, s, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    x, W, bias, a, b, s = inputs
    _, u = output
    ctx.save_for_backward(x, W, u, a, b)
    ctx.s = s
    ctx.set_materialize_grads(False)  # gu is None unless a loss uses u


def _backward(ctx, gy, gu):
    x, W, u, a, b = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    if gy is None:
        gy = x.new_zeros(x.shape[0], W.shape[0])
    dx, da, db = torch.ops.rank1.lora1_linear_backward(gy.contiguous(), x, W, u, a, b, ctx.s,
                                                       need_dx)
    if gu is not None:  # u = x . a: a loss through u adds gu a to dx and gu^T x to da
        da = da + gu.float() @ x.float()
        if need_dx:
            dx = dx + (gu.float()[:, None] * a).to(dx.dtype)
    return (dx if need_dx else None), None, None, da, db, None


torch.library.register_autograd("rank1::lora1_linear", _backward, setup_context=_setup_context)


@torch.library.impl("rank1::lora1_linear", "AutocastCUDA")
def _autocast(x, W, bias, a, b, s):
    dt = torch.get_autocast_dtype("cuda")
    with torch.autocast("cuda", enabled=False):
        return torch.ops.rank1.lora1_linear(x.to(dt), W.to(dt),
                                            None if bias is None else bias.to(dt), a, b, s)


def lora_linear(x, W, bias, A, B, s):
    """x (..., in), W (out, in) frozen, A (1, in), B (out, 1) fp32 -> (y (..., out), u (..., 1)
    fp32)."""
    shape = x.shape[:-1]
    y, u = torch.ops.rank1.lora1_linear(x.reshape(shape.numel(), x.shape[-1]).contiguous(), W, bias,
                                        A.reshape(-1), B.reshape(-1), float(s))
    return y.view(*shape, W.shape[0]), u.view(*shape, 1)
