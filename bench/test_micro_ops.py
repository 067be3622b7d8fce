"""pytest-benchmark cases for the fused micro-ops, so that regressions show up.

    .venv/bin/python -m pytest bench/test_micro_ops.py --benchmark-only [--benchmark-compare]

One WRN-16-8-sized flat buffer (10.96 M fp32 values); every available fused backend on the
device (CUDA if present, else CPU; the Triton interpreter is skipped: it measures Python).
"""

from __future__ import annotations

import pytest
import torch

import samfast
from samfast.backends import resolve_backend

pytest.importorskip("pytest_benchmark")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = 10_960_000
BACKENDS = [b for b in samfast.available_backends(DEVICE)
            if b != "reference" and not (b == "triton" and DEVICE.type == "cpu")]


@pytest.fixture(scope="module")
def buffers():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w, g, backup, buf = (torch.randn(N, device=DEVICE, generator=gen) for _ in range(4))
    return w, g, backup, buf, torch.zeros((), dtype=torch.bool, device=DEVICE)


def _run(benchmark, fn):
    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.pedantic(call, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_norm(benchmark, buffers, backend):
    ops = resolve_backend(backend, {DEVICE}).ops
    w, g, *_ = buffers
    _run(benchmark, lambda: ops.sq_norm(g, w, False, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ascent(benchmark, buffers, backend):
    ops = resolve_backend(backend, {DEVICE}).ops
    w, g, backup, _, skip = buffers
    scale = torch.tensor(1e-3, device=DEVICE)
    _run(benchmark, lambda: ops.ascent_(w, g, backup, scale, skip, False, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_and_sgd(benchmark, buffers, backend):
    ops = resolve_backend(backend, {DEVICE}).ops
    w, g, backup, buf, skip = buffers
    lr = torch.tensor(0.1, dtype=torch.float64, device=DEVICE)
    started = torch.tensor(True, device=DEVICE)
    _run(benchmark, lambda: ops.restore_sgd_(w, g, backup, buf, skip, lr, 0.9, 0.0, 5e-4,
                                             True, started))


def test_sgd_fused_reference_point(benchmark, buffers):
    w, g, *_ = buffers
    p = torch.nn.Parameter(w.clone())
    p.grad = g
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          fused=True)
    _run(benchmark, opt.step)
