"""The fused ops' contract: each op is declared here once (schema + fake implementation) and
implemented per backend against that declaration.

| namespace          | implementations                                   | registered by            |
|--------------------|---------------------------------------------------|--------------------------|
| ``samfast``        | C++ CPU kernels, CUDA C++ kernels                  | ``samfast._C`` (csrc/)   |
| ``samfast_triton`` | Triton kernels (CUDA; CPU under TRITON_INTERPRET) | ``samfast.kernels``      |

Both namespaces carry the same schemas, so a fused backend is ``torch.ops.samfast`` or
``torch.ops.samfast_triton`` and nothing else differs. The ops are ordinary custom operators:
``torch.compile`` traces them through their fake implementations, and a CUDA graph captures
them (none syncs with the host). The functions named ``reference_*`` below are the readable
specification of each op in plain PyTorch over 1-D slices; the tests and ``samfast-doctor``
check every implementation against them.

Maths (opmath = float32 for fp16/bf16/fp32 storage, float64 for fp64; one rounding to storage):

* ``sq_norm(g, w, adaptive, eta)``: sum of (T(w) g)^2 with T(w) = |w| + eta if adaptive else 1,
  accumulated in opmath (deterministic: fixed blocks, ordered partial sums, no atomics);
* ``nonfinite(g)``: how many entries of g are +-inf or NaN (float32 0-d tensor);
* ``ascent_(w, g, backup, scale, skip, adaptive, eta)``: backup <- w; unless ``skip``:
  w <- w + scale * T(w)^2 * g;
* ``restore_sgd_(w, g, backup, buf, skip, lr, momentum, dampening, weight_decay, nesterov,
  started)``: w <- backup, then torch.optim.SGD's update from there in its order of operations
  (d = g + wd * w; buf = d if not started else momentum * buf + (1 - dampening) * d;
  d = d + momentum * buf if nesterov else buf; w = w - lr * d), stepping with the buffer as
  stored. With ``skip`` set only the restore happens and ``buf`` is not written. ``lr`` is a
  float64 one-element tensor and ``started`` a bool one (whether ``buf`` holds a momentum
  buffer yet), both read on the device; ``backup`` may be ``w`` itself (a plain SGD step);
* ``looksam_dots(g, gs)``: the two sums LookSAM's projection needs, [sum g * gs, sum g^2], as
  a 1-D tensor of two opmath values (accumulated as ``sq_norm``: deterministic);
* ``looksam_project_(gv, gs, coef, skip)``: unless ``skip``: gv <- gs - coef * gv (gv holds
  the first-pass gradient g on entry, gs the SAM gradient, coef = g . gs / ||g||^2: gv becomes
  the component of gs orthogonal to g); returns the sum of squares of gv as stored after the
  op (opmath, 0-d), which the reuse steps need;
* ``looksam_reuse_(g, gv, coef, skip)``: unless ``skip``: g <- g + coef * gv (coef = alpha
  ||g|| / (||g_v|| + eps)): the gradient of a LookSAM step between two full ones.
  ``coef`` is a one-element tensor in opmath, ``skip`` a bool one, both read on the device;
* ``pgd_step(x_adv, grad, x, eps, alpha, norm, lo, hi)``: one PGD update (see
  samfast.adversarial), Triton only.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCHEMAS = {
    "sq_norm": "(Tensor g, Tensor w, bool adaptive, float eta) -> Tensor",
    "nonfinite": "(Tensor g) -> Tensor",
    "ascent_": "(Tensor(a!) w, Tensor g, Tensor(b!) backup, Tensor scale, Tensor skip, "
               "bool adaptive, float eta) -> ()",
    "restore_sgd_": "(Tensor(a!) w, Tensor g, Tensor backup, Tensor(b!) buf, Tensor skip, "
                    "Tensor lr, float momentum, float dampening, float weight_decay, "
                    "bool nesterov, Tensor started) -> ()",
    "looksam_dots": "(Tensor g, Tensor gs) -> Tensor",
    "looksam_project_": "(Tensor(a!) gv, Tensor gs, Tensor coef, Tensor skip) -> Tensor",
    "looksam_reuse_": "(Tensor(a!) g, Tensor gv, Tensor coef, Tensor skip) -> ()",
    "pgd_step": "(Tensor x_adv, Tensor grad, Tensor x, float eps, float alpha, str norm, "
                "float lo, float hi) -> Tensor",
}
# The SAM step's ops and LookSAM's; every fused namespace implements them.
SAM_OPS = ("sq_norm", "nonfinite", "ascent_", "restore_sgd_")
LOOKSAM_OPS = ("looksam_dots", "looksam_project_", "looksam_reuse_")
STEP_OPS = SAM_OPS + LOOKSAM_OPS


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_sq_norm(g, w, adaptive, eta):
    return g.new_empty((), dtype=_acc_dtype(g))


def _fake_nonfinite(g):
    return g.new_empty((), dtype=torch.float32)


def _fake_ascent(w, g, backup, scale, skip, adaptive, eta):
    return None


def _fake_restore_sgd(w, g, backup, buf, skip, lr, momentum, dampening, weight_decay,
                      nesterov, started):
    return None


def _fake_looksam_dots(g, gs):
    return g.new_empty((2,), dtype=_acc_dtype(g))


def _fake_looksam_project(gv, gs, coef, skip):
    return gv.new_empty((), dtype=_acc_dtype(gv))


def _fake_looksam_reuse(g, gv, coef, skip):
    return None


def _fake_pgd_step(x_adv, grad, x, eps, alpha, norm, lo, hi):
    return torch.empty_like(x_adv)


_FAKES = {"sq_norm": _fake_sq_norm, "nonfinite": _fake_nonfinite, "ascent_": _fake_ascent,
          "restore_sgd_": _fake_restore_sgd, "looksam_dots": _fake_looksam_dots,
          "looksam_project_": _fake_looksam_project, "looksam_reuse_": _fake_looksam_reuse,
          "pgd_step": _fake_pgd_step}
_LIBRARIES: dict[str, torch.library.Library] = {}


def define(namespace: str, names=STEP_OPS) -> torch.library.Library:
    """Declare ``names`` in ``namespace`` with the contract's schemas and fakes (once)."""
    if namespace not in _LIBRARIES:
        lib = torch.library.Library(namespace, "DEF")
        for name in names:
            lib.define(name + SCHEMAS[name])
            torch.library.register_fake(f"{namespace}::{name}", _FAKES[name], lib=lib)
        _LIBRARIES[namespace] = lib
    return _LIBRARIES[namespace]


# =============================================================================================
# reference implementations: the specification, in plain PyTorch over 1-D slices
# =============================================================================================

def _opmath(t: Tensor) -> Tensor:
    return t.to(_acc_dtype(t))


def _t(w: Tensor, adaptive: bool, eta: float) -> Tensor | float:
    return _opmath(w).abs() + eta if adaptive else 1.0


def reference_sq_norm(g: Tensor, w: Tensor, adaptive: bool, eta: float) -> Tensor:
    return (_t(w, adaptive, eta) * _opmath(g)).square().sum()


def reference_nonfinite(g: Tensor) -> Tensor:
    return (~torch.isfinite(g)).sum().to(torch.float32)


def reference_ascent_(w: Tensor, g: Tensor, backup: Tensor, scale: Tensor, skip: Tensor,
                      adaptive: bool, eta: float) -> None:
    backup.copy_(w)
    t = _t(w, adaptive, eta)
    e = (t * t) * _opmath(g) if adaptive else _opmath(g)
    new = _opmath(w) + e * scale.to(_acc_dtype(w))
    w.copy_(torch.where(skip, w, new.to(w.dtype)))


def reference_restore_sgd_(w: Tensor, g: Tensor, backup: Tensor, buf: Tensor, skip: Tensor,
                           lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                           nesterov: bool, started: Tensor) -> None:
    w0 = _opmath(backup)
    d = _opmath(g) + weight_decay * w0
    if momentum != 0:
        b = torch.where(started, _opmath(buf) * momentum + (1 - dampening) * d, d)
        stored = b.to(buf.dtype)
        buf.copy_(torch.where(skip, buf, stored))
        b = _opmath(stored)
        d = d + momentum * b if nesterov else b
    new = (w0 - lr.to(w0.dtype) * d).to(w.dtype)
    w.copy_(torch.where(skip, backup, new))


def reference_looksam_dots(g: Tensor, gs: Tensor) -> Tensor:
    a, b = _opmath(g), _opmath(gs)
    return torch.stack([(a * b).sum(), (a * a).sum()])


def reference_looksam_project_(gv: Tensor, gs: Tensor, coef: Tensor, skip: Tensor) -> Tensor:
    new = (_opmath(gs) - coef.to(_acc_dtype(gv)) * _opmath(gv)).to(gv.dtype)
    gv.copy_(torch.where(skip, gv, new))
    return _opmath(gv).square().sum()


def reference_looksam_reuse_(g: Tensor, gv: Tensor, coef: Tensor, skip: Tensor) -> None:
    new = (_opmath(g) + coef.to(_acc_dtype(g)) * _opmath(gv)).to(g.dtype)
    g.copy_(torch.where(skip, g, new))


REFERENCE = {"sq_norm": reference_sq_norm, "nonfinite": reference_nonfinite,
             "ascent_": reference_ascent_, "restore_sgd_": reference_restore_sgd_,
             "looksam_dots": reference_looksam_dots,
             "looksam_project_": reference_looksam_project_,
             "looksam_reuse_": reference_looksam_reuse_}
