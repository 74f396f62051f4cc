"""The patch layer's products on CPU: a fused linear + ReLU through oneDNN (MKL's sgemm where
this torch lacks it), its weight gradient through the BLAS that is fastest on this CPU, and that
layer for several pools that share their input, forward and backward in one GEMM each."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


@functools.cache
def onednn_linear() -> bool:
    """Whether this torch runs a fused linear + ReLU through oneDNN on CPU: built with it, and the
    (private) op answers a 2 x 2 call with the right values; else :func:`linear_relu` uses MKL."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return False
    x, w, b = torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.zeros(2)
    try:
        return bool(torch.equal(op(x, w, b, "relu", [], ""), torch.tensor([[1.0, 2.0], [3.0, 0.0]])))
    except RuntimeError:
        return False


@functools.cache
def weight_gradient_blas() -> tuple[str, str]:
    """Which BLAS runs :func:`weight_gradient`'s fp32 CPU product, and why (one line, logged by
    ``bd train``): numpy's OpenBLAS on AMD CPUs where its threads sleep between calls
    (``bd.OPENBLAS_THREADS_SLEEP``), torch's MKL elsewhere. Measured on a 2-core AMD EPYC (Zen 3):
    OpenBLAS ran the [256 x ~16 k] x [~16 k x 1,024] product 1.1-1.4x faster than MKL, which takes
    no Zen-tuned path, and a BD epoch ~7 % faster (benchmarks/train.py); on Intel CPUs MKL stays."""
    import bd
    from bd.device import cpu_info

    model = cpu_info().model
    if not model.startswith("AMD"):
        return "mkl", f"MKL (torch) for the weight-gradient product: {model} is not an AMD CPU"
    blas = _numpy_blas()
    if blas is None:
        return "mkl", "MKL (torch) for the weight-gradient product: numpy's BLAS is not OpenBLAS"
    if not bd.OPENBLAS_THREADS_SLEEP:
        return "mkl", ("MKL (torch) for the weight-gradient product: numpy was imported before bd without "
                       "OPENBLAS_THREAD_TIMEOUT, so OpenBLAS's threads would spin between calls")
    return "openblas", f"numpy's {blas} for the weight-gradient product on {model} (faster than MKL there)"


def _numpy_blas() -> str | None:
    """'OpenBLAS <version> (<kernel> kernels)' when numpy was built against OpenBLAS (pip's
    wheels bundle it; conda's may link it or MKL), else None."""
    import numpy as np
    from threadpoolctl import threadpool_info

    try:
        name = str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
    except (KeyError, TypeError, ValueError):
        return None
    libs = [lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"]
    if "openblas" not in name.lower() or not libs:
        return None
    return f"OpenBLAS {libs[0].get('version')} ({libs[0].get('architecture')} kernels)"


@functools.cache
def _openblas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(internal_api="openblas")


_OPENBLAS_THREADS = [0]  # the thread count last given to OpenBLAS


def weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x``: a linear layer's weight gradient [out, in] from its output's gradient
    [n, out] and its input [n, in]; fp32 CPU tensors go through :func:`weight_gradient_blas`'s
    BLAS, on as many threads as torch uses."""
    if grad.device.type != "cpu" or grad.dtype != torch.float32 or x.dtype != torch.float32 \
            or weight_gradient_blas()[0] != "openblas":
        return grad.t() @ x
    threads = torch.get_num_threads()
    if _OPENBLAS_THREADS[0] != threads:  # follow torch's setting (a one-thread run stays on one)
        _openblas_controller().limit(limits=threads)
        _OPENBLAS_THREADS[0] = threads
    return torch.from_numpy(grad.detach().numpy().T @ x.detach().numpy())


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x @ weight.T + bias)``, on CPU as one oneDNN matmul with the bias and ReLU applied
    in its epilogue: MKL's sgemm, which ``F.linear`` calls, ran this [~16 k x 1,024] x [1,024 x
    256] product 1.1-1.3x slower on an AMD EPYC (Zen 3, AVX2), and the ReLU was a second pass
    over the output (benchmarks/train.py). The same values up to float rounding. fp32 only: bf16
    already goes through oneDNN in ``F.linear``, and its inner product lacks bf16 on AVX2 CPUs."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] and onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
    return F.relu_(F.linear(x, weight, bias))


class _SharedInputLinearReLU(torch.autograd.Function):
    """``relu(x @ w_i.T + b_i)`` (as fp32) for several layers on the same input, one GEMM forward
    and one for all weight gradients. The ReLU runs in the GEMM's epilogue (:func:`linear_relu`),
    each layer's output is a column block of its result, and backward
    writes each layer's masked gradient straight into its columns of the weight-gradient GEMM's
    input: no concatenation and no extra per-layer tensors. Only the outputs are kept for backward
    (their sign is the ReLU's mask), and no gradient goes to ``x`` unless it asks for one (patch
    features are data). An output that gets no gradient gives its layer none (not zeros), so a
    loss of one branch leaves the other branch's parameters untouched, as separate layers do."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype, *weights_biases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, biases = weights_biases[0::2], weights_biases[1::2]
        xd = x.to(dtype)
        ctx.sizes, ctx.dtype = [w.shape[0] for w in weights], dtype
        y = linear_relu(xd, torch.cat(weights).to(dtype), torch.cat(biases).to(dtype))
        hs = y.split(ctx.sizes, dim=1)  # column blocks of y: views, no copy
        ctx.save_for_backward(xd, *hs, *weights)
        ctx.set_materialize_grads(False)
        return tuple(h.float() for h in hs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        xd, *saved = ctx.saved_tensors
        hs, weights = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        used = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * (2 + 2 * len(weights))
        if not used:
            return tuple(out)
        g = xd.new_empty((xd.shape[0], sum(ctx.sizes[i] for i in used)))
        col = 0
        for i in used:  # the ReLU's backward, written into this layer's columns of g
            width = ctx.sizes[i]
            torch.ops.aten.threshold_backward.grad_input(grads[i].to(ctx.dtype), hs[i], 0,
                                                         grad_input=g[:, col : col + width])
            col += width
        g_w = weight_gradient(g, xd).split([ctx.sizes[i] for i in used])
        g_b = g.sum(0).split([ctx.sizes[i] for i in used])
        for k, i in enumerate(used):
            out[2 + 2 * i] = g_w[k].to(weights[i].dtype)
            out[3 + 2 * i] = g_b[k].to(weights[i].dtype)
        if ctx.needs_input_grad[0]:
            out[0] = g @ torch.cat([weights[i] for i in used]).to(ctx.dtype)
        return tuple(out)
