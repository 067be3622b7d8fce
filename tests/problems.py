"""Synthetic SAM problems shared by the parity tests of every backend.

A problem is a list of parameters of odd shapes and a gradient that depends on the weights,
g(w) = a*w + b*sin(w) + c, with fresh random (a, b, c) per step (the minibatch) — so the
second pass really sees the gradient at the perturbed point. A per-step mask says which
params get a gradient in each pass (grad None otherwise: unused heads, frozen layers).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

import samfast
from ground_truth import GroundTruthSAM, GTGroup

SIZES = [(), (1,), (7,), (3, 5), (100003,), (4, 3, 3, 3)]


def seed_for(name: str) -> int:
    """A distinct, reproducible seed per test case."""
    return zlib.crc32(name.encode())


@dataclass
class Problem:
    init: list          # float64 initial weights
    coeffs: list        # per step: per param (a, b, c)
    masks: list         # per step: (pass-1 has grad, pass-2 has grad) per param
    groups: list        # GTGroup

    @property
    def steps(self) -> int:
        return len(self.coeffs)


def make_problem(seed: int, groups: list[GTGroup], steps: int = 5, sizes=SIZES,
                 masks: list | None = None) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in sizes]
    coeffs = [[tuple(torch.randn(s, generator=gen, dtype=torch.float64) for _ in range(3))
               for s in sizes] for _ in range(steps)]
    if masks is None:
        masks = [([True] * len(sizes), [True] * len(sizes)) for _ in range(steps)]
    return Problem(init, coeffs, masks, groups)


def grad_of(w: torch.Tensor, coeff) -> torch.Tensor:
    """g(w), computed in float64 from w and rounded to w's dtype."""
    a, b, c = (t.to(w.device) for t in coeff)
    w64 = w.detach().double()
    return (a * w64 + b * torch.sin(w64) + c).to(w.dtype)


def _backward(params, coeffs, mask) -> None:
    """Gradients by a real backward pass, as training produces them: the loss
    sum(w * G) with G = g(w) held constant has gradient exactly G. Params outside ``mask``
    take no part in the loss, so they get no gradient (grad None after zero_grad)."""
    terms = [(p * grad_of(p, coeff)).sum() for p, coeff, has in zip(params, coeffs, mask) if has]
    if terms:
        torch.stack([t.double() for t in terms]).sum().backward()


def base_factory(base: str, group: GTGroup):
    if base == "sgd":
        return torch.optim.SGD
    return functools.partial(torch.optim.AdamW, betas=group.betas, eps=group.adam_eps)


def group_options(base: str, g: GTGroup) -> dict:
    opts = dict(rho=g.rho, adaptive=g.adaptive, eta=g.eta, normalize=g.normalize, lr=g.lr,
                weight_decay=g.weight_decay)
    if base == "sgd":
        opts.update(momentum=g.momentum, dampening=g.dampening, nesterov=g.nesterov)
    return opts


def build_samfast(problem: Problem, dtype, base: str = "sgd", backend: str = "reference",
                  device: str = "cpu"):
    params = [torch.nn.Parameter(w.to(device=device, dtype=dtype).clone()) for w in problem.init]
    groups = [dict(params=[params[i] for i in g.params], **group_options(base, g))
              for g in problem.groups]
    opt = samfast.SAM(groups, base_optimizer=base_factory(base, problem.groups[0]),
                      eps=problem.groups[0].eps, backend=backend)
    return params, opt


def run_samfast(problem: Problem, dtype, base: str = "sgd", backend: str = "reference",
                device: str = "cpu", scheduler=None):
    """Explicit-API run; returns (params, opt)."""
    params, opt = build_samfast(problem, dtype, base, backend, device)
    sched = scheduler(opt) if scheduler else None
    opt.zero_grad()
    for t in range(problem.steps):
        _backward(params, problem.coeffs[t], problem.masks[t][0])
        opt.first_step(zero_grad=True)
        _backward(params, problem.coeffs[t], problem.masks[t][1])
        opt.second_step(zero_grad=True)
        if sched is not None:
            sched.step()
    return params, opt


def run_ground_truth(problem: Problem, dtype=torch.float64, base: str = "sgd",
                     lr_factor=lambda t: 1.0) -> list[torch.Tensor]:
    gt = GroundTruthSAM([w.to(dtype).clone() for w in problem.init], problem.groups, base)
    for t in range(problem.steps):
        g1 = [grad_of(w, c) if has else None
              for w, c, has in zip(gt.weights, problem.coeffs[t], problem.masks[t][0])]
        saved = gt.first_step(g1)
        g2 = [grad_of(w, c) if has else None
              for w, c, has in zip(gt.weights, problem.coeffs[t], problem.masks[t][1])]
        gt.second_step(saved, g2, lr_factor(t))
    return gt.weights


def max_abs_error(xs, refs) -> float:
    return max(float((x.detach().double() - r.double()).abs().max()) if r.numel() else 0.0
               for x, r in zip(xs, refs))


def assert_matches_ground_truth(params, problem: Problem, dtype, base: str = "sgd",
                                lr_factor=lambda t: 1.0) -> None:
    """fp64: 1e-10 relative. Lower precisions: the flash-attention rule — our error against
    the fp64 ground truth is at most 2x that of the same per-tensor maths run at ``dtype``
    (plus one ulp of the largest weight, so an exact low-precision baseline cannot demand
    better than exact)."""
    ref = run_ground_truth(problem, torch.float64, base, lr_factor)
    scale = max(float(r.abs().max()) for r in ref if r.numel())
    err = max_abs_error(params, ref)
    if dtype == torch.float64:
        assert err <= 1e-10 * scale, f"fp64 error {err:.3e} vs ground truth"
        return
    baseline = run_ground_truth(problem, dtype, base, lr_factor)
    baseline_err = max_abs_error(baseline, ref)
    if baseline_err != baseline_err or baseline_err == float("inf"):
        # The plain low-precision maths broke down (e.g. rho / eps overflows fp16 when g = 0):
        # no yardstick, so demand one ulp of the largest weight.
        baseline_err = 0.0
    ulp = torch.finfo(dtype).eps * scale
    assert err <= 2 * baseline_err + ulp, (
        f"{dtype}: error {err:.3e} > 2 x plain-{dtype} error {baseline_err:.3e} + {ulp:.1e}")
