"""Every backend against the independent float64 ground truth (and, for fused backends, the
reference backend): all SAM variants x SGD options / AdamW x dtypes, odd sizes, grads None."""

from __future__ import annotations

import pytest
import torch

import samfast
from ground_truth import GTGroup
from problems import (SIZES, assert_matches_ground_truth, make_problem, run_samfast,
                      seed_for)

VARIANTS = {
    "sam": dict(),
    "asam": dict(adaptive=True, rho=0.5),
    "asam_eta": dict(adaptive=True, rho=0.5, eta=0.01),
    "usam": dict(normalize=False, rho=0.02),
}
BASES = {
    "sgd": ("sgd", dict()),
    "sgd_momentum_dampening_wd": ("sgd", dict(momentum=0.9, dampening=0.1, weight_decay=5e-4)),
    "sgd_nesterov_wd": ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    # eps 1e-4: the default 1e-8 underflows to 0 in fp16, where torch.optim.AdamW divides by 0.
    "adamw": ("adamw", dict(lr=0.01, weight_decay=0.05, adam_eps=1e-4)),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def backends_on(device: str) -> list[str]:
    return samfast.available_backends(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_matches_ground_truth(backend, variant, base_name, dtype):
    base, base_opts = BASES[base_name]
    group = GTGroup(params=list(range(len(SIZES))), **{**VARIANTS[variant], **base_opts})
    problem = make_problem(seed_for(f"{backend}{variant}{base_name}{dtype}"), [group])
    params, opt = run_samfast(problem, dtype, base, backend)
    assert opt.backend == backend
    assert opt.skipped_steps == 0
    assert_matches_ground_truth(params, problem, dtype, base)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_grad_none_frozen_then_unfrozen_and_0d(backend, dtype):
    """Param 0 (0-d) is frozen for two steps then unfrozen; param 1 gets a grad only in the
    first pass of step 1 (perturbed then restored, not stepped); param 2 never gets one."""
    n = len(SIZES)
    on = [True] * n

    def mask(off1=(), off2=()):
        return ([i not in off1 for i in range(n)], [i not in off2 for i in range(n)])

    masks = [mask((0, 2), (0, 2)), mask((0, 2), (0, 1, 2)), mask((2,), (2,)), (on, on)]
    group = GTGroup(params=list(range(n)), momentum=0.9, weight_decay=1e-3)
    problem = make_problem(seed_for(f"none{backend}{dtype}"), [group], steps=4, masks=masks)
    init = [w.clone() for w in problem.init]
    params, _ = run_samfast(problem, dtype, "sgd", backend)
    assert_matches_ground_truth(params, problem, dtype)
    assert not torch.equal(params[0].detach().double(), init[0].to(dtype).double())

    problem.masks = masks[:3]
    problem.coeffs = problem.coeffs[:3]
    params, opt = run_samfast(problem, dtype, "sgd", backend)
    assert torch.equal(params[2].detach(), init[2].to(dtype)), "never-graded param moved"
    assert params[2] not in opt.state or not opt.state[params[2]]


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_two_groups_with_their_own_rho_lr_adaptive(backend):
    groups = [GTGroup(params=[0, 2, 4], rho=0.1, lr=0.05, momentum=0.9),
              GTGroup(params=[1, 3, 5], rho=0.7, adaptive=True, eta=0.01, lr=0.2,
                      weight_decay=1e-2)]
    problem = make_problem(seed_for(f"groups{backend}"), groups)
    for dtype in (torch.float64, torch.float32):
        params, _ = run_samfast(problem, dtype, "sgd", backend)
        assert_matches_ground_truth(params, problem, dtype)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_lr_scheduler_attached(backend, recwarn):
    group = GTGroup(params=list(range(len(SIZES))), lr=0.1, momentum=0.9)
    problem = make_problem(seed_for(f"sched{backend}"), [group], steps=6)

    def sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    params, opt = run_samfast(problem, torch.float64, "sgd", backend, scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert opt.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert_matches_ground_truth(params, problem, torch.float64,
                                lr_factor=lambda t: 0.5 ** (t // 2))
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_zero_gradients_give_no_nan(backend, dtype):
    group = GTGroup(params=list(range(len(SIZES))), momentum=0.9, weight_decay=1e-2)
    problem = make_problem(seed_for(f"zero{backend}"), [group], steps=2)
    for step in problem.coeffs:
        for i, (a, b, c) in enumerate(step):
            step[i] = (a * 0, b * 0, c * 0)
    params, opt = run_samfast(problem, dtype, "sgd", backend)
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.skipped_steps == 0
    assert_matches_ground_truth(params, problem, dtype)
