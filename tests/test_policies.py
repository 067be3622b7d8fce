"""SAM policies (samfast/policies.py) on every backend against an independent float64
reference, written here from the papers' equations one tensor at a time (no samfast code):

* SwitchSchedule: SAM on the epochs it says (here one step per epoch);
* Interval(k) (Composer): SAM on steps t with (t + 1) % k == 0;
* LookSAM(k, alpha) (Liu et al., CVPR 2022, Algorithm 1): on t % k == 0 a SAM step that
  stores g_v = g_s - (g . g_s / ||g||^2) g; otherwise g + alpha ||g|| / (||g_v|| + eps) g_v;
* RandomSwitch(p, seed) (Zhao et al., 2022): SAM when the step's draw u_t < p;
* AdaptiveSAM (Jiang et al., ICLR 2023): SAM when ||g||^2 >= mu_t + c_t sigma_t.

Then: composition with sam_enabled, both closure conventions, a mid-run resume through
torch.save / torch.load(weights_only=True) that continues bit-identically, and the edge cases
(a skipped LookSAM full step drops g_v; an aborted AdaptiveSAM step decides again).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import shutil
import warnings

import pytest
import torch

import samfast
from ground_truth import GroundTruthSAM, GTGroup
from problems import _backward, build_samfast, grad_of, make_problem, max_abs_error, seed_for

BACKENDS = samfast.available_backends("cpu")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# The fused orchestration is one class over either namespace and the Triton kernels' dtypes
# are covered op by op in test_kernels.py, so the slow Triton interpreter runs the policies
# in fp32 only, and where a test concerns the optimizer's logic alone, not at all.
SLOW = {"triton"}
CASES = [(b, d) for b in BACKENDS for d in DTYPES if b not in SLOW or d == torch.float32]
# Odd sizes and a 0-d param; 100003 makes every fused kernel run several programs.
SIZES = [(), (7,), (3, 5), (100003,), (4, 3, 3, 3)]
STEPS = 8
SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, rho=0.1)


# =============================================================================================
# the independent reference: the policies' decisions and LookSAM's algebra, float64 per tensor
# =============================================================================================

def ref_uniform(seed: int, t: int) -> float:
    """RandomSwitch's documented draw: the first 56 bits of SHA-256("samfast.RandomSwitch:
    seed:t") over 2^56."""
    digest = hashlib.sha256(f"samfast.RandomSwitch:{seed}:{t}".encode()).digest()
    return int.from_bytes(digest[:7], "big") / 2.0 ** 56


class RefPolicy:
    """Decides the plan of step t: "sam", "base", "full" (LookSAM SAM step) or "reuse"."""

    def __init__(self, kind: str, **opts) -> None:
        self.kind, self.opts, self.t = kind, opts, 0
        self.mu = self.var = 0.0

    def plan(self, g_sq: float) -> str:
        o, t = self.opts, self.t
        if self.kind == "none":
            return "sam"
        if self.kind == "interval":
            return "sam" if (t + 1) % o["k"] == 0 else "base"
        if self.kind == "looksam":
            return "full" if t % o["k"] == 0 else "reuse"
        if self.kind == "random":
            return "sam" if ref_uniform(o["seed"], t) < o["p"] else "base"
        if self.kind == "adaptive":  # Jiang et al. 2023, Algorithm 1
            d = o["delta"]
            self.mu = d * self.mu + (1 - d) * g_sq
            self.var = d * self.var + (1 - d) * (g_sq - self.mu) ** 2
            frac = min(t, o["total_steps"]) / o["total_steps"]
            c = o["lambda1"] * frac + o["lambda2"] * (1 - frac)
            return "sam" if g_sq >= self.mu + c * math.sqrt(self.var) else "base"
        raise ValueError(self.kind)


def make_policy(kind: str, **opts):
    return {"none": lambda: None,
            "interval": lambda: samfast.Interval(opts["k"]),
            "looksam": lambda: samfast.LookSAM(opts["k"], opts["alpha"]),
            "random": lambda: samfast.RandomSwitch(opts["p"], seed=opts["seed"]),
            "adaptive": lambda: samfast.AdaptiveSAM(opts["total_steps"], opts["delta"],
                                                    opts["lambda1"], opts["lambda2"])}[kind]()


POLICIES = {
    "interval": ("interval", dict(k=3)),
    "looksam": ("looksam", dict(k=3, alpha=0.7)),
    "random": ("random", dict(p=0.4, seed=11)),
    # a constant threshold below the mean: SAM on most steps, but not all
    "adaptive": ("adaptive", dict(total_steps=STEPS, delta=0.5, lambda1=-0.3, lambda2=-0.3)),
}


def run_reference(problem, kind, opts, enabled, dtype=torch.float64):
    """The whole run in ``dtype`` (float64: the ground truth); returns (weights, plans)."""
    gt = GroundTruthSAM([w.to(dtype).clone() for w in problem.init], problem.groups, "sgd")
    policy = RefPolicy(kind, **opts)
    gv, alpha, plans = None, opts.get("alpha"), []
    for t in range(problem.steps):
        m1, m2 = problem.masks[t]
        g1 = [grad_of(w, c) if has else None
              for w, c, has in zip(gt.weights, problem.coeffs[t], m1)]
        if not enabled[t]:
            plans.append("base")
            gt.base_step(g1)
            continue
        g_sq = sum(float(g.double().square().sum()) for g in g1 if g is not None)
        plan = policy.plan(g_sq)
        policy.t += 1
        plans.append(plan)
        if plan in ("sam", "full"):
            saved = gt.first_step(g1)
            g2 = [grad_of(w, c) if has else None
                  for w, c, has in zip(gt.weights, problem.coeffs[t], m2)]
            if plan == "full":  # a missing gradient is a zero vector
                g = [x if x is not None else torch.zeros_like(w) for x, w in zip(g1, gt.weights)]
                gs = [x if x is not None else torch.zeros_like(w) for x, w in zip(g2, gt.weights)]
                dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g, gs))
                gg = sum(float(a.double().square().sum()) for a in g)
                coef = dot / gg if gg > 0 else 0.0
                gv = [b - coef * a for a, b in zip(g, gs)]
            gt.second_step(saved, g2)
        elif plan == "reuse" and gv is not None:
            g_norm = math.sqrt(g_sq)
            gv_norm = math.sqrt(sum(float(v.double().square().sum()) for v in gv))
            coef = alpha * g_norm / (gv_norm + 1e-12)
            gt.base_step([None if g is None else g + coef * v for g, v in zip(g1, gv)])
        else:
            gt.base_step(g1)
    return gt.weights, plans


def assert_close_to_reference(params, problem, kind, opts, enabled, dtype, plans):
    """fp64: 1e-10 relative and the same plans; lower precisions: at most 2x the error of the
    same per-tensor maths run at ``dtype`` plus one ulp of the largest weight."""
    ref, ref_plans = run_reference(problem, kind, opts, enabled)
    assert plans == ref_plans
    scale = max(float(r.abs().max()) for r in ref if r.numel())
    err = max_abs_error(params, ref)
    if dtype == torch.float64:
        assert err <= 1e-10 * scale, f"fp64 error {err:.3e}"
        return
    baseline, _ = run_reference(problem, kind, opts, enabled, dtype)
    baseline_err = max_abs_error(baseline, ref)
    ulp = torch.finfo(dtype).eps * scale
    assert err <= 2 * baseline_err + ulp, f"{dtype}: {err:.3e} vs 2 x {baseline_err:.3e} + {ulp:.1e}"


# =============================================================================================
# samfast runs: the explicit API and both closure conventions
# =============================================================================================

def problem_for(name: str, steps: int = STEPS, masks=None):
    group = GTGroup(params=list(range(len(SIZES))), **SGD)
    return make_problem(seed_for(name), [group], steps=steps, sizes=SIZES, masks=masks)


def explicit_step(opt, params, problem, t):
    m1, m2 = problem.masks[t]
    if not opt.sam_enabled:
        _backward(params, problem.coeffs[t], m1)
        opt.base_step(zero_grad=True)
        return "base"
    plan = opt.plan_step()
    _backward(params, problem.coeffs[t], m1)
    opt.first_step(zero_grad=True)
    two = opt.perturbed
    if two:
        _backward(params, problem.coeffs[t], m2)
    opt.second_step(zero_grad=True)
    return {"sam": "sam", "base": "base", "looksam_full": "full", "looksam_reuse": "reuse",
            "decide": "sam" if two else "base"}[plan]


def closure_for(params, problem, t, calls):
    def closure():
        mask = problem.masks[t][len(calls)]
        calls.append(1)
        terms = [(p * grad_of(p, c)).sum() for p, c, has in zip(params, problem.coeffs[t], mask)
                 if has]
        loss = torch.stack([x.double() for x in terms]).sum()
        loss.backward()
        return loss
    return closure


def run(problem, dtype, backend, kind, opts, enabled=None, style="explicit", start=0,
        resume_from=None):
    """Steps [start, problem.steps) with samfast; returns (params, opt, plans)."""
    enabled = enabled or [True] * problem.steps
    params, opt = build_samfast(problem, dtype, "sgd", backend)
    opt.policy = make_policy(kind, **opts)
    if resume_from is not None:
        weights, state = resume_from
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        opt.load_state_dict(state)
    plans = []
    for t in range(start, problem.steps):
        opt.sam_enabled = enabled[t]
        if style == "explicit":
            plans.append(explicit_step(opt, params, problem, t))
            continue
        calls = []
        before = opt.counters["sam_steps"]
        if style == "backward_first":  # davda54 / pytorch-optimizer: the first pass is ours
            closure_for(params, problem, t, calls)()
            assert opt.step(closure_for(params, problem, t, calls)) is None
        else:
            opt.step(closure_for(params, problem, t, calls))
        assert len(calls) == 1 + (opt.counters["sam_steps"] - before)
        opt.zero_grad()
        plans.append(None)
    return params, opt, plans


# =============================================================================================
# tests
# =============================================================================================

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend, dtype", CASES, ids=str)
def test_policy_matches_float64_reference(backend, dtype, policy):
    """Every step's plan and the weights after 8 steps; some steps have params without a
    gradient in one pass (so LookSAM's zeros and the masked runs of the fused kernels count),
    and sam_enabled is off for two steps (a plain base step that does not advance the policy)."""
    kind, opts = POLICIES[policy]
    n = len(SIZES)
    on = [True] * n
    masks = [(on, on)] * STEPS
    # params without a gradient in one pass, on steps of every kind (LookSAM's full steps
    # are steps 0 and 4, Interval's SAM steps 2 and 7)
    masks[0] = ([i != 2 for i in range(n)], [i != 3 for i in range(n)])
    masks[2] = ([i != 0 for i in range(n)], on)
    masks[4] = ([i != 1 for i in range(n)], [i not in (1, 3) for i in range(n)])
    masks[5] = ([i != 4 for i in range(n)], on)
    masks[7] = ([i != 3 for i in range(n)], [i != 3 for i in range(n)])
    enabled = [True, True, True, False, True, True, False, True]
    problem = problem_for(f"{backend}{policy}{dtype}", masks=masks)
    params, opt, plans = run(problem, dtype, backend, kind, opts, enabled)
    assert opt.backend == backend and opt.skipped_steps == 0
    assert opt.policy.step == sum(enabled)
    assert_close_to_reference(params, problem, kind, opts, enabled, dtype, plans)
    ref_plans = run_reference(problem, kind, opts, enabled)[1]
    assert {"sam", "base"} <= set(ref_plans) or {"full", "reuse"} <= set(ref_plans), ref_plans
    counters = opt.counters
    assert counters["steps"] == STEPS
    assert counters["sam_steps"] == sum(p in ("sam", "full") for p in ref_plans)
    assert counters["passes"] == STEPS + counters["sam_steps"]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_switch_schedule_is_a_policy_of_whole_epochs(backend):
    """SwitchSchedule (unchanged) sets sam_enabled per epoch: with one step per epoch and no
    per-step policy, SAM exactly on its SAM epochs; with Interval(2) inside its SAM phase,
    SAM every second step of that phase (the policy counts only steps it was consulted on)."""
    problem = problem_for(f"switch{backend}")
    schedule = samfast.SwitchSchedule(STEPS, sam_start=3)
    enabled = [schedule.sam_at(t) for t in range(STEPS)]
    for kind, opts in (("none", {}), ("interval", dict(k=2))):
        params, opt = build_samfast(problem, torch.float64, "sgd", backend)
        opt.policy = make_policy(kind, **opts)
        plans = []
        for t in range(STEPS):
            schedule.apply(opt, t)
            plans.append(explicit_step(opt, params, problem, t))
        assert_close_to_reference(params, problem, kind, opts, enabled, torch.float64, plans)
        sam_steps = [t for t, p in enumerate(plans) if p == "sam"]
        assert sam_steps == ([3, 4, 5, 6, 7] if kind == "none" else [4, 6])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_both_closure_conventions_equal_the_explicit_api(backend, policy):
    kind, opts = POLICIES[policy]
    problem = problem_for(f"closure{backend}{policy}")
    explicit, _, _ = run(problem, torch.float32, backend, kind, opts)
    for style in ("closure", "backward_first"):
        params, opt, _ = run(problem, torch.float32, backend, kind, opts, style=style)
        assert all(torch.equal(a, b) for a, b in zip(params, explicit)), style
        assert opt.policy.step == STEPS


@pytest.mark.parametrize("backend, policy", [(b, p) for b in BACKENDS for p in POLICIES
                                             if b not in SLOW or p == "looksam"])
def test_resume_mid_run_is_bit_identical(backend, policy):
    """Steps 0..4, state_dict through torch.save / torch.load(weights_only=True) into a fresh
    optimizer whose policy is freshly built (RandomSwitch with another seed: the seed is part
    of the saved state), steps 5..7: bitwise the uninterrupted run, params and momentum."""
    kind, opts = POLICIES[policy]
    problem = problem_for(f"resume{backend}{policy}")
    straight, opt_a, _ = run(problem, torch.float32, backend, kind, opts)
    cut = 5
    first = problem_for(f"resume{backend}{policy}", steps=cut)
    first.coeffs, first.masks = problem.coeffs[:cut], problem.masks[:cut]
    params, opt, _ = run(first, torch.float32, backend, kind, opts)
    buf = io.BytesIO()
    torch.save({"w": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["samfast"]["policy"]["name"] == kind
    assert saved["opt"]["samfast"]["policy"]["step"] == cut
    fresh_opts = {**opts, "seed": 99} if kind == "random" else opts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, opt_b, _ = run(problem, torch.float32, backend, kind, fresh_opts, start=cut,
                                resume_from=(saved["w"], saved["opt"]))
    # the checkpoint's seed is used, and said so
    said = [str(w.message) for w in caught if "load_state_dict" in str(w.message)]
    assert said == ([f"samfast: RandomSwitch.load_state_dict: the checkpoint's seed="
                     f"{opts.get('seed', 0)} (was 99); the checkpoint's values are used, as "
                     "torch.optim's load_state_dict restores its lr"] if kind == "random"
                    else []), said
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for i in sa["state"]:
        assert torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])
    pa, pb = sa["samfast"]["policy"], sb["samfast"]["policy"]
    if kind == "looksam":
        la, lb = pa.pop("looksam"), pb.pop("looksam")
        assert all(torch.equal(a, b) for a, b in zip(la["gv"], lb["gv"]))
        assert torch.equal(la["gv_sq_norm"], lb["gv_sq_norm"]) and bool(lb["gv_valid"])
    assert pa == pb


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_looksam_full_step_drops_g_v(backend):
    """A non-finite second-pass gradient skips the full step (weights and momentum unchanged)
    and leaves no g_v: the reuse steps after it are plain base steps, as the reference says
    when no g_v was stored."""
    problem = problem_for(f"skip{backend}", steps=3)
    params, opt = build_samfast(problem, torch.float64, "sgd", backend)
    opt.policy = samfast.LookSAM(k=3, alpha=0.7)
    before = [p.detach().clone() for p in params]
    for t, plan in enumerate(["full", "reuse", "reuse"]):
        _backward(params, problem.coeffs[t], problem.masks[t][0])
        opt.first_step(zero_grad=True)
        if opt.perturbed:
            _backward(params, problem.coeffs[t], problem.masks[t][1])
            params[1].grad[0] = float("nan")
        opt.second_step(zero_grad=True)
        if plan == "full":
            assert opt.skipped_steps == 1
            # w restored bit-exactly; no momentum buffer started
            assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
            assert not opt.state_dict()["state"]
    gt = GroundTruthSAM([w.clone() for w in problem.init], problem.groups, "sgd")
    for t in (1, 2):
        gt.base_step([grad_of(w, c) for w, c in zip(gt.weights, problem.coeffs[t])])
    assert max_abs_error(params, gt.weights) <= 1e-10 * max(float(w.abs().max()) for w in gt.weights)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_an_aborted_adaptive_step_decides_again_from_the_same_statistics(backend):
    problem = problem_for(f"abort{backend}", steps=1)
    params, opt = build_samfast(problem, torch.float64, "sgd", backend)
    opt.policy = samfast.AdaptiveSAM(total_steps=10, lambda1=-5.0, lambda2=-5.0)  # always SAM
    _backward(params, problem.coeffs[0], problem.masks[0][0])
    opt.first_step(zero_grad=True)
    assert opt.perturbed
    state = opt.policy.state_dict()
    opt.abort_step()
    assert {k: v for k, v in opt.policy.state_dict().items() if k != "hparams"} == \
        {"name": "adaptive", "step": 0, "mean": 0.0, "var": 0.0}
    _backward(params, problem.coeffs[0], problem.masks[0][0])
    opt.first_step(zero_grad=True)
    assert opt.policy.state_dict() == state


def test_policy_arguments_and_states_are_checked():
    for make, name in ((lambda: samfast.Interval(0), "k"), (lambda: samfast.Interval(2.0), "k"),
                       (lambda: samfast.LookSAM(alpha=-1), "alpha"),
                       (lambda: samfast.RandomSwitch(1.5), "p"),
                       (lambda: samfast.RandomSwitch(0.5, seed=-1), "seed"),
                       (lambda: samfast.AdaptiveSAM(0), "total_steps"),
                       (lambda: samfast.AdaptiveSAM(10, delta=1.0), "delta"),
                       (lambda: samfast.RandomSwitch.linear(0.1, 2.0, 10), "p_end")):
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            make()
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = samfast.SAM(params, lr=0.1, backend="reference")
    with pytest.raises(TypeError, match="Invalid policy"):
        opt.policy = "interval"
    opt.policy = samfast.Interval(2)
    sd = opt.state_dict()
    other = samfast.SAM(params, lr=0.1, backend="reference", policy=samfast.LookSAM())
    with pytest.raises(ValueError, match="'interval'"):
        other.load_state_dict(sd)
    bare = samfast.SAM(params, lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="has none"):
        bare.load_state_dict(sd)
    sd["samfast"]["policy"]["step"] = -1
    with pytest.raises(ValueError, match="policy step"):
        opt.load_state_dict(sd)
    assert opt.policy.step == 0
    linear = samfast.RandomSwitch.linear(0.0, 1.0, total_steps=4)
    assert [linear.probability(t) for t in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_adaptive_statistics_and_decisions_follow_the_papers_recursion():
    """AE-SAM over 300 steps of a drifting, noisy ||g||^2 with the default linear threshold:
    every decision and the final mean and variance equal the reference recursion's."""
    gen = torch.Generator().manual_seed(5)
    values = (torch.linspace(3.0, 1.0, 300, dtype=torch.float64)
              * torch.exp(0.3 * torch.randn(300, generator=gen, dtype=torch.float64))).tolist()
    policy = samfast.AdaptiveSAM(total_steps=300)
    ref = RefPolicy("adaptive", total_steps=300, delta=0.9, lambda1=-1.0, lambda2=1.0)
    decisions = []
    for s in values:
        assert policy.plan() == "decide"
        decisions.append(policy.decide(s))
        policy.advance()
        assert decisions[-1] == (ref.plan(s) == "sam")
        ref.t += 1
    assert 0.2 < sum(decisions) / 300 < 0.8
    assert math.isclose(policy.mean, ref.mu, rel_tol=1e-12)
    assert math.isclose(policy.var, ref.var, rel_tol=1e-12)
    assert not policy.decide(float("nan")) and policy.mean == ref.mu  # no update


def test_random_switch_runs_sam_on_about_p_of_the_steps():
    policy = samfast.RandomSwitch(0.25, seed=3)
    sam = 0
    for _ in range(4000):
        sam += policy.plan() == "sam"
        policy.advance()
    assert abs(sam / 4000 - 0.25) < 0.03  # 4.4 standard deviations


# =============================================================================================
# the trainer: --sam-policy, the fraction of SAM steps and the cost of every epoch
# =============================================================================================

def trainer_args(out, *extra):
    from samfast.cifar.demo import DEMO_DATA
    return ["--data-dir", str(DEMO_DATA), "--train-subset", "200", "--test-subset", "100",
            "--batch-size", "50", "--out", str(out), "--quiet", "--device", "cpu",
            "--backend", "native" if "native" in BACKENDS else "reference", *extra]


def test_trainer_runs_each_policy_counts_its_passes_and_resumes_bit_identically(tmp_path,
                                                                                 training_passes):
    """4 steps per epoch, SAM from epoch 1 of 3: each policy's SAM steps are counted in the
    rows (and equal the forward passes the model saw beyond one per step), the cost is in
    SGD-step equivalents, and a run stopped after epoch 2 and resumed ends bit-identical
    (RandomSwitch's draws, AE-SAM's statistics and LookSAM's g_v all come from last.pt)."""
    from samfast.cifar import train as trainer
    passes = training_passes
    common = ("--epochs", "3", "--sam-start", "1", "--deterministic", "--lr-schedule", "cosine")
    flags = {"interval": ["--interval-k", "2"], "looksam": ["--looksam-k", "3"],
             "random": ["--random-p", "0.5"], "adaptive": ["--adaptive-lambda1", "0",
                                                           "--adaptive-lambda2", "0"]}
    for policy, extra in flags.items():
        args = trainer_args(tmp_path / policy, *common, "--sam-policy", policy, *extra,
                            "--snapshot-epochs", "2")
        passes.clear()
        summary = trainer.run(trainer.parse_config(args))
        rows = [json.loads(r) for r in (tmp_path / policy / "metrics.jsonl").read_text().splitlines()]
        assert [r["steps"] for r in rows] == [4, 4, 4]
        assert rows[0]["sam_steps"] == 0 and rows[0]["cost_sgd_steps"] >= 4
        sam_steps = sum(r["sam_steps"] for r in rows)
        assert len(passes) == 12 + sam_steps == summary["cost"]["passes"]
        if policy == "interval":
            assert [r["sam_steps"] for r in rows] == [0, 2, 2]
        if policy == "looksam":  # full steps at the policy's steps 0, 3, 6
            assert [r["sam_steps"] for r in rows] == [0, 2, 1]
        # (AE-SAM's running mean starts at 0, so over 8 steps most are SAM steps)
        assert 0 < sam_steps < 8 or policy == "adaptive" and sam_steps == 8, (policy, rows)
        assert summary["cost"]["sam_fraction"] == sam_steps / 12
        assert sam_steps + 12 <= summary["cost"]["cost_sgd_steps"] < 1.5 * (sam_steps + 12)
        # resumed from the state at the start of epoch 2 (its snapshot, as last.pt)
        cut = tmp_path / f"{policy}-cut"
        cut.mkdir()
        shutil.copy(tmp_path / policy / "epoch_2.pt", cut / "last.pt")
        trainer.run(trainer.parse_config(trainer_args(cut, *common, "--sam-policy", policy,
                                                      *extra, "--resume")))
        straight = torch.load(tmp_path / policy / "last.pt", weights_only=True)
        resumed = torch.load(cut / "last.pt", weights_only=True)
        assert all(torch.equal(straight["model"][k], resumed["model"][k])
                   for k in straight["model"])
        pa, pb = (c["optimizer"]["samfast"]["policy"] for c in (straight, resumed))
        assert pa["step"] == 8
        la, lb = pa.pop("looksam", None), pb.pop("looksam", None)
        assert pa == pb
        if la is not None:
            assert all(torch.equal(a, b) for a, b in zip(la["gv"], lb["gv"]))


def test_smoke_efficient_spends_each_budget_and_reports_cost(tmp_path, capsys):
    """samfast-reproduce efficient at smoke scale (one seed, one budget: 25%, 4 epochs of 4
    steps): every run is trained (the late switch forked from the SGD run), each policy
    spends its budget of SAM steps, and the report has cost, error and sharpness per run and
    the figure."""
    from samfast import reproduce
    assert reproduce.main(["efficient", "--scale", "smoke", "--seeds", "1",
                           "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "SGD->SAM@3 seed 0 (forked from" in err
    root = tmp_path / "smoke" / "efficient"
    res = json.loads((root / "results.json").read_text())
    assert set(res) == set(reproduce.runs_of("efficient", "smoke"))
    fraction = {name: rs[0]["sam_fraction"] for name, rs in res.items()}
    assert fraction["SGD"] == 0 and fraction["SAM"] == 1
    for name in ("SGD->SAM@3", "interval k=4", "LookSAM k=4 a=0.2"):
        assert fraction[name] == 0.25, (name, fraction)
    assert "interval k=10" in reproduce.runs_of("efficient", "small") and len(res) == 7
    cost = {name: rs[0]["cost"] for name, rs in res.items()}
    assert cost["SGD"] < cost["interval k=4"] < cost["SAM"]
    text = (root / "results.md").read_text()
    assert "cost x SGD" in text and "AE-SAM c=0.67" in text and (root / "figure.png").exists()
    settings = json.loads((root / "settings.json").read_text())
    assert settings["budgets"]["value"] == [0.25]
    assert settings["regime"]["value"] == "generalization" and settings["epochs"]["value"] == 4
    assert reproduce.main(["efficient", "--scale", "smoke", "--seeds", "1",
                           "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err.count("skip") == len(res)  # finished runs are not rerun


def test_efficient_counts_only_passes_for_epochs_trained_before_costs_were_measured(tmp_path):
    """A late switch forked from a generalization-grid SGD run trained before cost accounting:
    its two inherited SGD epochs count one pass per step (3 steps of 100 of 250 images), its
    own SAM epoch its measured cost."""
    from samfast import reproduce
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "test_acc": 60.0, "train_acc": 100.0, "hessian_top": [5.0, 4.0], "sam_epochs": 1,
        "epochs": 3, "config": {"train_subset": 250, "batch_size": 100, "test_subset": None}}))
    rows = [{"epoch": 0, "phase": "sgd", "inherited": True},
            {"epoch": 1, "phase": "sgd", "inherited": True},
            {"epoch": 2, "phase": "sam", "steps": 3, "sam_steps": 3, "passes": 6,
             "cost_sgd_steps": 6.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = reproduce._efficient_seed(run)
    assert (got["passes"], got["cost"], got["estimated"]) == (12, 12.25, 2)
    assert got["sam_fraction"] == 3 / 9 and got["error"] == 40.0 and got["top1"] == 5.0


@pytest.mark.parametrize("via", ["step", "sam_step"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_policies_with_a_grad_scaler_unscale_every_pass_and_back_off_on_overflow(backend, via):
    """fp16 AMP through step(closure, grad_scaler): a one-pass step unscales its pass, a SAM
    step both, and an AE-SAM step that decides on a base step hands GradScaler back the
    record of its (only) pass, so update() sees it: the weights then equal the run without
    scaling (up to fp16 rounding), and an inf in a one-pass step backs the scale off."""
    from torch.nn import functional as F

    from samfast.distributed import sam_step

    def train(policy, scaler, poison_step=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = samfast.SAM(model.parameters(), backend=backend, lr=0.1, momentum=0.9,
                          policy=policy())
        for step in range(6):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)

            if via == "sam_step":  # samfast.distributed.sam_step: backward and update its own
                def loss_fn():
                    with torch.autocast("cpu", dtype=torch.float16):
                        return F.cross_entropy(model(x).float(), y)
                poison = (model[0].weight.register_hook(
                    lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
                    if step == poison_step else None)
                sam_step(model, opt, loss_fn, grad_scaler=scaler)
                if poison is not None:
                    poison.remove()
                continue

            def closure():
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = F.cross_entropy(model(x).float(), y)
                (scaler.scale(loss) if scaler else loss).backward()
                if step == poison_step:
                    next(model.parameters()).grad[0, 0] = float("inf")
                return loss
            opt.step(closure, grad_scaler=scaler)
            if scaler:
                scaler.update()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), opt

    for policy, sam_steps in (
            (lambda: samfast.Interval(2), 3), (lambda: samfast.LookSAM(k=2), 3),
            (lambda: samfast.AdaptiveSAM(10, lambda1=50.0, lambda2=50.0), 0),  # never SAM
            (lambda: samfast.AdaptiveSAM(10, lambda1=-50.0, lambda2=-50.0), 6)):  # always
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        scaled, opt = train(policy, scaler)
        plain, _ = train(policy, None)
        assert opt.counters["sam_steps"] == sam_steps and opt.counters["steps"] == 6
        assert opt.skipped_steps == 0 and scaler.get_scale() == 2.0 ** 10
        assert float((scaled - plain).norm()) <= 1e-2 * float(plain.norm())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _, opt = train(lambda: samfast.Interval(2), scaler, poison_step=2)  # step 2: one pass
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 9


def _bn_cnn() -> torch.nn.Module:
    """A CNN with BatchNorm (the trainer's kind of model), small enough for float64."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _looksam_by_hand(model, batches, k, alpha, rho, lr, momentum, weight_decay):
    """LookSAM's Algorithm 1 (Liu et al. 2022) in a plain loop over torch.optim.SGD with
    whole-model vectors; BatchNorm's running statistics are not updated by the second pass
    (SAM's usual rule, written here with track_running_stats, not samfast.bn)."""
    from torch.nn import functional as F
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def grads(x, y):
        base.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return [p.grad.detach().clone() for p in params]

    def dot(a, b):
        return sum((u * v).sum() for u, v in zip(a, b))

    gv = None
    for t, (x, y) in enumerate(batches):
        g = grads(x, y)
        if t % k == 0:
            e = [rho * gi / dot(g, g).sqrt() for gi in g]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            for m in bns:
                m.track_running_stats = False
            gs = grads(x, y)
            for m in bns:
                m.track_running_stats = True
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.sub_(ei)
            gv = [s - dot(g, gs) / dot(g, g) * gi for s, gi in zip(gs, g)]
            update = gs
        else:
            coef = alpha * dot(g, g).sqrt() / dot(gv, gv).sqrt()
            update = [gi + coef * v for gi, v in zip(g, gv)]
        for p, u in zip(params, update):
            p.grad = u
        base.step()
    return model


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_looksam_through_sam_step_on_a_batchnorm_cnn_equals_algorithm_1_by_hand(backend):
    """The trainer's path (samfast.distributed.sam_step, one or two passes as LookSAM plans,
    BatchNorm left alone in the second pass) over 9 steps (three full steps, six reuse steps),
    float64: weights and BatchNorm buffers equal a hand-written loop of the paper's algorithm
    to 1e-10. (The small-scale experiment's LookSAM at alpha 0.7 did not train; this rules out
    the trainer's path as the cause: an independent loop of the same algorithm does the same.)"""
    from torch.nn import functional as F

    from samfast.distributed import sam_step
    hp = dict(k=3, alpha=0.7, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(seed_for("looksam-bn" + backend))
    init = _bn_cnn().double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 4, (16,), generator=gen)) for _ in range(9)]
    expected = _looksam_by_hand(copy.deepcopy(init).train(), batches, **hp)
    model = copy.deepcopy(init).train()
    opt = samfast.SAM(model.parameters(), backend=backend, lr=hp["lr"], rho=hp["rho"],
                      momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                      # eps 1e-300: ||g_v|| + eps == ||g_v|| in float64, as the paper's division
                      policy=samfast.LookSAM(hp["k"], hp["alpha"], eps=1e-300))
    for x, y in batches:
        sam_step(model, opt, lambda: F.cross_entropy(model(x), y))
    assert opt.backend == backend
    assert (opt.counters["sam_steps"], opt.counters["passes"]) == (3, 12)
    got, want = model.state_dict(), expected.state_dict()
    for name in want:
        scale = max(1.0, float(want[name].double().abs().max()))
        err = float((got[name].double() - want[name].double()).abs().max())
        assert err <= 1e-10 * scale, (name, err)


def test_counters_time_both_halves_of_a_sam_step_and_count_passes(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(10))]
    opt = samfast.SAM(params, lr=0.1, backend="reference")
    backend = opt._backend
    for name in ("first_step", "second_step", "base_step"):
        real = getattr(backend, name)

        def slow(*a, _real=real, **k):
            import time
            time.sleep(0.05)
            return _real(*a, **k)
        monkeypatch.setattr(backend, name, slow)
    for sam in (True, False):
        opt.sam_enabled = sam
        opt.step(lambda: (params[0] ** 2).sum().backward())
    c = opt.counters
    assert (c["steps"], c["sam_steps"], c["passes"]) == (2, 1, 3)
    assert 0.15 <= c["optimizer_s"] < 1.0  # 0.05 s in each of the three calls
    opt.reset_counters()
    assert opt.counters == {"steps": 0, "sam_steps": 0, "passes": 0, "optimizer_s": 0.0}


def test_second_pass_due_tells_a_one_pass_step_from_a_skipped_ascent():
    params = [torch.nn.Parameter(torch.randn(10))]
    opt = samfast.SAM(params, lr=0.1, backend="reference", policy=samfast.Interval(2))
    assert not opt.second_pass_due
    (params[0] ** 2).sum().backward()
    opt.first_step(zero_grad=True)            # t = 0: a base step, taken whole
    assert not opt.second_pass_due and not opt.perturbed
    opt.second_step()
    (params[0] ** 2).sum().backward()
    params[0].grad[0] = float("inf")
    opt.first_step(zero_grad=True)            # t = 1: SAM, ascent skipped
    assert opt.second_pass_due and not opt.perturbed
    (params[0] ** 2).sum().backward()
    opt.second_step()
    assert not opt.second_pass_due and opt.skipped_steps == 1 and opt.policy.step == 2


def test_efficient_families_put_each_run_where_it_belongs():
    from samfast import reproduce
    want = {"SGD": "SGD", "SAM": "SAM", "SGD->SAM@60": "SGD->SAM", "SGD->SAM@72": "SGD->SAM"}
    names = reproduce.runs_of("efficient", "small")
    for name in names:
        family = reproduce.efficient_family(name)
        assert family == want.get(name, name.split(" ")[0]), (name, family)
    assert {reproduce.efficient_family(n) for n in names} == set(reproduce.EFFICIENT_FAMILIES)


def _write_run(root, name, seed, rows, **summary):
    """A finished run of the efficient experiment as the report reads it: summary.json
    (``summary`` over a few defaults) and the metrics rows."""
    from samfast import reproduce
    run = root / reproduce._slug(name) / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "test_acc": 60.0, "train_acc": 100.0, "hessian_top": [5.0, 4.0], "sam_epochs": 1,
        "epochs": 1, "config": {"train_subset": 200, "batch_size": 100, "test_subset": None},
        **summary}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_efficient_report_gives_no_cost_ratio_against_a_passes_only_sgd_run(tmp_path):
    """SGD trained before cost accounting (passes only), a policy run measured: the passes
    are compared, the mixed cost ratio is not given (it would charge optimizer time to one
    side only); with both measured it is."""
    from samfast import reproduce

    def write(name, rows, sam_epochs):
        _write_run(tmp_path, name, 0, rows, sam_epochs=sam_epochs, epochs=2)

    measured = [{"epoch": e, "phase": "sam", "steps": 2, "sam_steps": 1, "passes": 3,
                 "cost_sgd_steps": 3.5} for e in range(2)]
    write("interval k=2", measured, 2)
    write("SGD", [{"epoch": e, "phase": "sgd"} for e in range(2)], 0)
    runs = {"SGD": [], "interval k=2": []}
    text = reproduce.report_efficient(tmp_path, runs, 1, "smoke")
    row = next(line for line in text.splitlines() if line.startswith("| interval k=2"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "50.0" and cells[4] == "—", cells  # 6 passes vs 4; no mixed ratio
    shutil.rmtree(tmp_path / "SGD")
    write("SGD", [{"epoch": e, "phase": "sgd", "steps": 2, "sam_steps": 0, "passes": 2,
                   "cost_sgd_steps": 2.1} for e in range(2)], 0)
    text = reproduce.report_efficient(tmp_path, runs, 1, "smoke")
    row = next(line for line in text.splitlines() if line.startswith("| interval k=2"))
    assert [c.strip() for c in row.strip("|").split("|")][4] == "1.667"  # 7 / 4.2


def test_efficient_report_pairs_sharpness_by_seed_and_per_extra_pass(tmp_path):
    """λ1 vs SGD, the λ1 drop per 10% extra passes and λ1 vs the late switch of the same
    budget are paired by seed: with SGD's λ1 at 100 / 140 and the policy's at 90 / 120 on 25%
    / 50% extra passes, the paired differences are -10 / -20 (mean -15), the drops per 10% are
    4 / 4 (mean 4, zero spread), and against the switch's 93 / 124 -3 / -4; an unpaired
    reading (mean λ1 105 vs 120) would give none of them."""
    from samfast import reproduce

    def write(name, seed, passes, top1):
        _write_run(tmp_path, name, seed, [
            {"epoch": 0, "phase": "sam", "steps": 4, "sam_steps": passes - 4, "passes": passes,
             "cost_sgd_steps": float(passes)}], test_acc=60.0 + seed, hessian_top=[top1, 1.0],
            config={"train_subset": 400, "batch_size": 100, "test_subset": None})

    runs = reproduce.runs_of("efficient", "smoke")
    (switch,) = [n for n in runs if n.startswith("SGD->SAM")]
    (policy,) = [n for n in runs if n.startswith("interval")]
    for seed, (sgd_top, run_top, run_passes) in enumerate(((100.0, 90.0, 5), (140.0, 120.0, 6))):
        write("SGD", seed, 4, sgd_top)
        write(policy, seed, run_passes, run_top)
        write(switch, seed, 5, run_top + 3 + seed)  # the policy is 3 / 4 below the switch
    text = reproduce.report_efficient(tmp_path, {"SGD": [], switch: [], policy: []}, 2, "smoke")
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    def cells(name):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        return dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
    mine = cells(policy)
    assert mine["extra passes %"].startswith("37.5 ±"), mine
    assert mine["λ1 vs SGD (paired)"].startswith("-15.0 ±"), mine
    assert mine["λ1 drop per 10% extra passes"] == "4.0 ± 0.0", mine
    assert mine["λ1 vs late switch (paired)"].startswith("-3.5 ±"), mine
    assert cells(switch)["λ1 vs late switch (paired)"] == "—"
    assert list(cells("SGD").values())[-3:] == ["—", "—", "—"]
    assert (tmp_path / "figure.png").stat().st_size > 0


def _looksam_twins(backend, alpha_b=0.0):
    """Two optimizers on copies of one problem, LookSAM(k=3) at alpha 0.5 and alpha_b: where
    the first one's g_v is not valid its reuse steps are base steps, as alpha 0's always are."""
    torch.manual_seed(seed_for("twins" + backend))
    a0, b0 = torch.randn(7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    twins = []
    for alpha in (0.5, alpha_b):
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        opt = samfast.SAM([a], lr=0.1, momentum=0.9, rho=0.1, backend=backend,
                          policy=samfast.LookSAM(k=3, alpha=alpha))
        twins.append((a, b, opt))
    return twins


def _looksam_step(a, b, opt):
    def closure():
        opt.zero_grad()
        loss = (a.sin() * a).sum() + (b.cos() * b ** 2).sum() + (a[:3] * b).sum()
        loss.backward()
        return loss
    opt.step(closure)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_looksam_g_v_is_dropped_by_add_param_group(backend):
    """g_v has no part for params added after the full step that stored it: add_param_group
    drops it, so the reuse steps until the next full step are base steps (bitwise the alpha-0
    twin's), and the
    full step after them stores a g_v over every param (the twins part from the next reuse
    step on). Without the drop the reference raised KeyError and native a TypeError."""
    (a, b, opt), (a2, b2, opt2) = _looksam_twins(backend)
    for x, y, o in ((a, b, opt), (a2, b2, opt2)):
        _looksam_step(x, y, o)  # t=0, full
        o.add_param_group({"params": [y]})
        _looksam_step(x, y, o)  # t=1, reuse: g_v not valid -> base
        _looksam_step(x, y, o)  # t=2, same
    assert torch.equal(a, a2) and torch.equal(b, b2)
    for x, y, o in ((a, b, opt), (a2, b2, opt2)):
        _looksam_step(x, y, o)  # t=3, full: g_v over a and b
    assert torch.equal(a, a2) and torch.equal(b, b2)
    for x, y, o in ((a, b, opt), (a2, b2, opt2)):
        _looksam_step(x, y, o)  # t=4, reuse with g_v
    assert not torch.equal(a, a2) and not torch.equal(b, b2)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_hyper_parameters_travel_with_the_checkpoint(policy):
    """state_dict() holds the constructor's arguments; load_state_dict into a policy built
    with other ones uses the checkpoint's and names each change in a warning (as torch.optim
    restores the checkpoint's lr); bad ones are refused naming the argument; a checkpoint
    without them (written before samfast saved them) loads silently."""
    kind, opts = POLICIES[policy]
    other = {"interval": dict(k=7), "looksam": dict(k=2, alpha=0.2),
             "random": dict(p=0.9, seed=3),
             "adaptive": dict(total_steps=5, delta=0.8, lambda1=1.0, lambda2=2.0)}[policy]
    params = [torch.nn.Parameter(torch.randn(4))]
    saved = samfast.SAM(params, lr=0.1, policy=make_policy(kind, **opts)).state_dict()
    state = saved["samfast"]["policy"]
    assert state["hparams"] == {k: v for k, v in opts.items()} | (
        {"eps": 1e-12} if kind == "looksam" else {})
    opt = samfast.SAM(params, lr=0.1, policy=make_policy(kind, **{**opts, **other}))
    with pytest.warns(UserWarning, match="the checkpoint's values are used") as caught:
        opt.load_state_dict(copy.deepcopy(saved))
    for key in other:
        assert f"{key}={opts[key]!r} (was {other[key]!r})" in str(caught[0].message)
    assert opt.policy.hparams() == state["hparams"]
    fresh = make_policy(kind, **opts)
    for t in range(40):  # the loaded policy plans what the checkpoint's policy would
        opt.policy.step = fresh.step = t
        assert opt.policy.plan() == fresh.plan()
    bad_key = next(iter(other))
    broken = copy.deepcopy(saved)
    broken["samfast"]["policy"]["hparams"][bad_key] = -5
    with pytest.raises(ValueError, match=f"Invalid state_dict: .*Invalid {bad_key}"):
        opt.load_state_dict(broken)
    old = copy.deepcopy(saved)
    del old["samfast"]["policy"]["hparams"]
    mine = make_policy(kind, **{**opts, **other})
    if kind == "random":
        old["samfast"]["policy"]["seed"] = other["seed"]
    opt = samfast.SAM(params, lr=0.1, policy=mine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(old)
    assert opt.policy.hparams() == mine.hparams()


def test_random_switch_saves_its_linear_schedule_but_not_a_function():
    params = [torch.nn.Parameter(torch.randn(4))]
    saved = samfast.SAM(params, lr=0.1, policy=samfast.RandomSwitch.linear(
        0.1, 0.5, 100, seed=1)).state_dict()
    assert saved["samfast"]["policy"]["hparams"] == {"p": [0.1, 0.5, 100], "seed": 1}
    opt = samfast.SAM(params, lr=0.1, policy=samfast.RandomSwitch(0.3, seed=1))
    with pytest.warns(UserWarning, match=r"p=\[0.1, 0.5, 100\] \(was 0.3\)"):
        opt.load_state_dict(saved)
    assert [opt.policy.probability(t) for t in (0, 50, 100, 200)] == \
        [0.1, 0.1 + 0.4 * 0.5, 0.5, 0.5]
    func = samfast.SAM(params, lr=0.1, policy=samfast.RandomSwitch(lambda t: 0.2))
    assert func.state_dict()["samfast"]["policy"]["hparams"]["p"] is None
    opt = samfast.SAM(params, lr=0.1, policy=samfast.RandomSwitch(0.3))
    opt.load_state_dict(func.state_dict())  # a function is not saved: this policy's p stays
    assert opt.policy.probability(5) == 0.3


def test_policy_arguments_fail_at_construction_and_numpy_numbers_are_numbers():
    import numpy as np
    with pytest.raises(ValueError, match=r"Invalid eps: 0.0 \(must be > 0\)"):
        samfast.LookSAM(eps=0.0)  # ||g_v|| = 0 would make the reuse coefficient infinite
    with pytest.raises(ValueError, match=r"Invalid p: p\(0\) = 2.0"):
        samfast.RandomSwitch(lambda t: 2.0)  # a function is checked at t = 0, not mid-run
    assert samfast.Interval(np.int64(4)).k == 4 and type(samfast.Interval(np.int64(4)).k) is int
    assert samfast.RandomSwitch(np.float32(0.5)).probability(3) == 0.5
    assert samfast.AdaptiveSAM(np.int32(10), delta=np.float64(0.5)).total_steps == 10
    assert samfast.RandomSwitch(lambda t: np.float32(0.25)).probability(1) == 0.25
    with pytest.raises(ValueError, match="Invalid k"):
        samfast.Interval(np.float64(4.0))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_looksam_with_a_zero_g_v_leaves_the_gradient_as_it_is(backend):
    """rho = 0: the SAM gradient is g itself, so g_v = 0 and a reuse step is exactly a base
    step (alpha ||g|| / (0 + eps) * 0 = 0; eps = 0 gave inf * 0 = NaN, and native stepped on
    it)."""
    (a, b, opt), (a2, b2, opt2) = _looksam_twins(backend)
    for group in opt.param_groups + opt2.param_groups:
        group["rho"] = 0.0
    for _ in range(3):
        _looksam_step(a, b, opt)
        _looksam_step(a2, b2, opt2)
    assert float(opt.state_dict()["samfast"]["policy"]["looksam"]["gv_sq_norm"]) == 0.0
    assert torch.isfinite(a).all() and torch.equal(a, a2) and opt.skipped_steps == 0
