"""Is a fused implementation right on this device? Each op of the contract (``samfast/ops.py``)
against its plain-PyTorch reference on fresh random data, on an aligned buffer and on a
misaligned slice of odd length (the vectorized and the scalar code paths).

Used twice: ``backend="auto"`` runs :func:`check_backend` once per (backend, device) in a
process before handing a fused backend out (a few milliseconds on small buffers), and
``samfast-doctor`` runs it on realistic buffers and reports every error.

Tolerances: the elementwise ops compute in opmath and round once, as the references do, so
they may differ only where a coefficient or an intermediate rounds differently: at most one
ulp of the storage dtype at the scale of the operands (|result| + |inputs|; measuring
against |result| alone would blow up wherever w - lr * d cancels). The reductions sum in
another order: 1024 ulps of opmath (fp32: 1.2e-4 relative; a sum of 2048 terms per lane
may lose ~45 ulps typically, 2048 at worst) on the sum of squares, where a lost block or a
wrong term is off by far more; the count of non-finite entries must be exact. A broken kernel is off by the operands themselves: ~1e7
ulps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops as contract


@dataclass
class OpCheck:
    op: str
    dtype: torch.dtype
    case: str          # "aligned" or "misaligned"
    max_error: float   # in units of the tolerance's scale (ulps of storage / opmath)
    ok: bool
    detail: str = ""

    def line(self) -> str:
        status = "ok" if self.ok else "WRONG"
        return (f"{self.op:<13} {str(self.dtype).replace('torch.', ''):<9} {self.case:<10} "
                f"{status:<5} max error {self.max_error:.3g} ulp{'  ' + self.detail if self.detail else ''}")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ulps(got: Tensor, want: Tensor, *operands: Tensor) -> float:
    """max |got - want| in ulps of ``want``'s storage dtype at the scale |want| + |operands|
    (NaNs must match NaNs)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return float("inf")
    scale = want.double().abs()
    for t in operands:
        scale = scale + t.double().abs()
    g, w, scale = got.double()[~nan], want.double()[~nan], scale[~nan]
    if not g.numel():
        return 0.0
    eps, tiny = torch.finfo(want.dtype).eps, torch.finfo(want.dtype).tiny
    return float(((g - w).abs() / (scale * eps + tiny)).max())


def _inputs(n: int, dtype: torch.dtype, device, offset: int, seed: int) -> list[Tensor]:
    """w, g, backup, buf as slices [offset, offset + n) of fresh random buffers."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n + offset, generator=gen, dtype=torch.float64)
            .to(dtype).to(device)[offset:] for _ in range(4)]


def check_ops(namespace, device: torch.device, dtype: torch.dtype, n: int, offset: int,
              seed: int = 0) -> list[OpCheck]:
    """Every SAM op of ``namespace`` (a ``torch.ops`` namespace) against the reference."""
    case = "aligned" if offset == 0 else "misaligned"
    opmath = _opmath(dtype)
    w, g, backup, buf = _inputs(n, dtype, device, offset, seed)
    flag = lambda v: torch.tensor(v, device=device)  # noqa: E731
    scale = torch.tensor(0.37, dtype=opmath, device=device)
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)
    ref = contract.REFERENCE
    results = []

    def record(op, err, limit, detail=""):
        results.append(OpCheck(op, dtype, case, err, err <= limit, detail))

    try:
        for adaptive in (False, True):
            got = namespace.sq_norm(g, w, adaptive, 0.01)
            want = ref["sq_norm"](g.double(), w.double(), adaptive, 0.01)
            err = float(abs(got.double() - want) / (want * torch.finfo(opmath).eps))
            record("sq_norm", err, 1024.0, "adaptive" if adaptive else "")
        bad = g.clone()
        bad[[0, n // 2, n - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                               dtype=dtype, device=device)
        count = float(namespace.nonfinite(bad))
        record("nonfinite", abs(count - 3.0), 0.0, f"counted {count:g} of 3")
        for adaptive in (False, True):
            got_w, got_b = w.clone(), torch.empty_like(w)
            want_w, want_b = w.clone(), torch.empty_like(w)
            namespace.ascent_(got_w, g, got_b, scale, flag(False), adaptive, 0.01)
            ref["ascent_"](want_w, g, want_b, scale, flag(False), adaptive, 0.01)
            err = max(_ulps(got_w, want_w, w, g), _ulps(got_b, want_b))
            record("ascent_", err, 1.0, "adaptive" if adaptive else "")
        for momentum, nesterov, started in ((0.0, False, False), (0.9, True, True),
                                            (0.9, False, False)):
            outs = []
            for impl in (namespace.restore_sgd_, ref["restore_sgd_"]):
                ws, ms = w.clone(), buf.clone()
                impl(ws, g, backup, ms, flag(False), lr, momentum, 0.1, 5e-4, nesterov,
                     flag(started))
                outs.append((ws, ms))
            err = max(_ulps(outs[0][0], outs[1][0], backup, g, buf),
                      _ulps(outs[0][1], outs[1][1], g, buf, backup))
            record("restore_sgd_", err, 1.0,
                   f"momentum={momentum:g} nesterov={nesterov} started={started}")
        ws = w.clone()  # the skip flag: restore only
        namespace.restore_sgd_(ws, g, backup, buf.clone(), flag(True), lr, 0.9, 0.0, 0.0,
                               False, flag(True))
        record("restore_sgd_", 0.0 if torch.equal(ws, backup) else float("inf"), 0.0, "skip")
    except Exception as exc:  # noqa: BLE001 - a kernel that raises is a failed check
        results.append(OpCheck("(launch)", dtype, case, float("inf"), False,
                               f"{type(exc).__name__}: {exc}"))
    return results


def check_pgd(namespace, device: torch.device, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> list[OpCheck]:
    """The fused PGD step against samfast.adversarial's reference (both norms)."""
    from .adversarial import pgd_step_reference
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 3, 17, 13, generator=gen).to(dtype).to(device)
    g = torch.randn(x.shape, generator=gen).to(dtype).to(device)
    x_adv = (x + 0.01 * torch.randn(x.shape, generator=gen).to(device)).clamp(0, 1).to(dtype)
    results = []
    for norm, eps, alpha in (("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)):
        try:
            got = namespace.pgd_step(x_adv, g, x, eps, alpha, norm, 0.0, 1.0)
            want = pgd_step_reference(x_adv.float(), g.float(), x.float(), eps, alpha, norm,
                                      0.0, 1.0).to(dtype)
            # the L2 step divides by two per-example norms summed in another order
            err = _ulps(got, want, x, x_adv)
            results.append(OpCheck("pgd_step", dtype, norm, err, err <= 4.0))
        except Exception as exc:  # noqa: BLE001
            results.append(OpCheck("pgd_step", dtype, norm, float("inf"), False,
                                   f"{type(exc).__name__}: {exc}"))
    return results


def check_backend(name: str, device: torch.device, n: int = 4099,
                  dtypes=(torch.float32, torch.bfloat16), offsets=(0, 1)) -> list[OpCheck]:
    """Each op of backend ``name`` on ``device``, per dtype, on an aligned buffer (offset 0)
    and on a slice one element in (offset 1: the unaligned code paths)."""
    from . import backends
    namespace = backends.ops_namespace(name)
    results = []
    for dtype in dtypes:
        for offset in offsets:
            results += check_ops(namespace, device, dtype, n, offset)
    return results
