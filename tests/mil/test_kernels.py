"""The patch layer's CPU products (bd.mil.kernels): oneDNN or MKL forward, OpenBLAS or MKL weight
gradient, the same values and gradients either way, and the BLAS choice made for a stated reason."""

from __future__ import annotations

import pytest
import torch

import bd
from bd.mil import kernels

DIM = 12


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_relu_by_onednn_or_mkl_and_its_input_gradient(onednn, monkeypatch):
    """The patch layer's product gives F.linear + ReLU's values either way (oneDNN where this
    torch has it, MKL where not), and its gradients, the input's too when the input asks."""
    if onednn and not kernels.onednn_linear():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(kernels, "onednn_linear", lambda: onednn)
    torch.manual_seed(1)
    x, w, b = torch.randn(300, DIM), torch.randn(7, DIM), torch.randn(7)
    torch.testing.assert_close(kernels.linear_relu(x, w, b), torch.relu(x @ w.T + b), rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    (kernels._SharedInputLinearReLU.apply(leaves[0], torch.float32, leaves[1], leaves[2])[0] ** 2).sum().backward()
    plain = [t.clone().requires_grad_(True) for t in (x, w, b)]
    (torch.relu(plain[0] @ plain[1].T + plain[2]) ** 2).sum().backward()
    for fused, ref in zip(leaves, plain):
        torch.testing.assert_close(fused.grad, ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blas", ["openblas", "mkl"])
def test_weight_gradient_by_either_blas_is_grad_transpose_times_input(blas, monkeypatch):
    """``grad.T @ x`` either way, for contiguous and transposed-view gradients; bf16 goes to torch."""
    monkeypatch.setattr(kernels, "weight_gradient_blas", lambda: (blas, ""))
    torch.manual_seed(2)
    x, g = torch.randn(500, DIM), torch.randn(500, 7)
    torch.testing.assert_close(kernels.weight_gradient(g, x), g.t() @ x, rtol=1e-5, atol=1e-4)
    gt = torch.randn(7, 500).t()  # a transposed view
    torch.testing.assert_close(kernels.weight_gradient(gt, x), gt.t() @ x, rtol=1e-5, atol=1e-4)
    out = kernels.weight_gradient(g.bfloat16(), x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (7, DIM)


def test_weight_gradient_through_openblas_uses_torchs_thread_count(monkeypatch):
    """A one-thread run stays on one thread in OpenBLAS too, and two threads come back with torch's."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if kernels._numpy_blas() is None:
        pytest.skip("numpy's BLAS is not OpenBLAS here")
    monkeypatch.setattr(kernels, "weight_gradient_blas", lambda: ("openblas", ""))
    threads = torch.get_num_threads()

    def openblas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["internal_api"] == "openblas"}

    x, g = torch.randn(64, DIM), torch.randn(64, 3)
    try:
        torch.set_num_threads(1)
        kernels.weight_gradient(g, x)
        assert openblas_threads() == {1}
        torch.set_num_threads(2)
        kernels.weight_gradient(g, x)
        assert openblas_threads() == {2}
    finally:
        torch.set_num_threads(threads)
        kernels.weight_gradient(g, x)


@pytest.mark.parametrize(("model", "blas", "sleep", "choice", "why"), [
    ("AMD EPYC 7B13 64-Core Processor", "OpenBLAS 0.3 (Haswell kernels)", True, "openblas", "OpenBLAS 0.3"),
    ("Intel(R) Xeon(R) Platinum 8480+", "OpenBLAS 0.3 (Haswell kernels)", True, "mkl", "not an AMD CPU"),
    ("AMD EPYC 7B13 64-Core Processor", None, True, "mkl", "not OpenBLAS"),
    ("AMD EPYC 7B13 64-Core Processor", "OpenBLAS 0.3 (Haswell kernels)", False, "mkl", "OPENBLAS_THREAD_TIMEOUT"),
])
def test_weight_gradient_blas_choice_and_reason(model, blas, sleep, choice, why, monkeypatch):
    """OpenBLAS only on AMD CPUs, where numpy's BLAS is OpenBLAS and its threads sleep between calls."""
    from bd import device

    monkeypatch.setattr(device, "cpu_info", lambda: device.CpuInfo(model, frozenset(), "AVX2"))
    monkeypatch.setattr(kernels, "_numpy_blas", lambda: blas)
    monkeypatch.setattr(bd, "OPENBLAS_THREADS_SLEEP", sleep)
    kernels.weight_gradient_blas.cache_clear()
    try:
        name, reason = kernels.weight_gradient_blas()
    finally:
        kernels.weight_gradient_blas.cache_clear()
    assert name == choice and why in reason
