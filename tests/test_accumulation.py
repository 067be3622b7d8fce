"""Gradient accumulation and clipping in ``samfast.distributed.sam_step``, against a hand-written
float64 reference (tests/ground_truth.py), without and with DDP (2 gloo ranks, one spawn)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import samfast
from samfast.distributed import sam_step

from ground_truth import GroundTruthSAM, GTGroup
from test_distributed import WORLD, _free_port, full_batch, gloo_group, make_model, shard

BACKENDS = [b for b in samfast.available_backends("cpu") if b != "triton"]
STEPS = 8
SAM_FROM = 3  # steps 0..2 are the SGD phase of a switch schedule, 3.. SAM
OPT = dict(rho=0.1, lr=0.05, momentum=0.9)


def micro(x, y, k):
    return list(zip(x.chunk(k), y.chunk(k)))


def run_samfast(backend, k=None, *, normalize=True, clip=None, clip_ascent=False, scaler=None,
                dtype=torch.float64):
    """STEPS steps of sam_step on the full batches, in k micro-batches if k is given."""
    model = make_model().to(dtype)
    opt = samfast.SAM(model.parameters(), backend=backend, normalize=normalize, **OPT)
    schedule = samfast.SwitchSchedule(STEPS, sam_start=SAM_FROM)
    for step in range(STEPS):
        schedule.apply(opt, step)
        x, y = full_batch(step)
        x = x.to(dtype)
        if k is None:
            loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        else:
            parts = micro(x, y, k)
            loss_fn = lambda i: F.cross_entropy(model(parts[i][0]), parts[i][1])  # noqa: E731
        sam_step(model, opt, loss_fn, grad_scaler=scaler, accumulation_steps=k,
                 clip_grad_norm=clip, clip_ascent=clip_ascent)
    return model


def clipped(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ written out: g * min(1, max_norm / (|g| + 1e-6))."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads], norm


def run_reference(normalize=True, clip=None, clip_ascent=False, norms=None):
    """The same steps written from the formulas: full-batch gradients, SGD phase then SAM."""
    model = make_model()
    params = list(model.parameters())
    gt = GroundTruthSAM([p.data for p in params],
                        [GTGroup(list(range(len(params))), normalize=normalize, **OPT)])

    def grads(x, y):
        g = [t.detach() for t in torch.autograd.grad(F.cross_entropy(model(x), y), params)]
        if clip is None:
            return g
        g, norm = clipped(g, clip)
        if norms is not None:
            norms.append(norm)
        return g
    for step in range(STEPS):
        x, y = full_batch(step)
        if step < SAM_FROM:
            gt.base_step(grads(x, y))
            continue
        g = [t.detach() for t in torch.autograd.grad(F.cross_entropy(model(x), y), params)]
        saved = gt.first_step(clipped(g, clip)[0] if clip_ascent else g)
        gt.second_step(saved, grads(x, y))
    return model


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_give_the_full_batch_step(backend, k):
    reference = run_reference()
    assert_same(run_samfast(backend, k), reference)
    assert_same(run_samfast(backend), reference)


@pytest.mark.parametrize("normalize", [True, False], ids=["sam", "usam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_applies_to_the_descent_gradient(backend, normalize):
    norms = []
    reference = run_reference(normalize, clip=0.3, norms=norms)
    assert sum(n > 0.3 for n in norms) >= STEPS // 2  # the clip was active on most steps
    assert_same(run_samfast(backend, 4, normalize=normalize, clip=0.3), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_ascent_bounds_usam_and_changes_nothing_for_sam(backend):
    assert_same(run_samfast(backend, 2, normalize=False, clip=0.3, clip_ascent=True),
                run_reference(False, clip=0.3, clip_ascent=True))
    unclipped = run_reference(False, clip=0.3)
    with pytest.raises(AssertionError):  # for USAM it is a different step
        assert_same(run_samfast(backend, 2, normalize=False, clip=0.3, clip_ascent=True),
                    unclipped)
    # normalized SAM: e = rho g / |g| is scale-free, so clipping the ascent gradient is inert
    assert_same(run_samfast(backend, 2, clip=0.3, clip_ascent=True),
                run_reference(True, clip=0.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_under_fp16_loss_scaling_acts_on_the_unscaled_gradient(backend):
    """A power-of-two loss scale is exact in fp32: the scaled run clips exactly as the
    unscaled one (a clip of the still-scaled gradient would shrink it 1024 times more)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
    scaled = run_samfast(backend, 2, clip=0.3, scaler=scaler, dtype=torch.float32)
    plain = run_samfast(backend, 2, clip=0.3, dtype=torch.float32)
    assert scaler.get_scale() == 2.0 ** 10
    assert_same(scaled, plain, rtol=1e-6, atol=1e-7)


def test_a_raising_micro_batch_in_the_second_pass_restores_the_weights():
    model = make_model()
    opt = samfast.SAM(model.parameters(), **OPT)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = full_batch(0)
    parts, calls = micro(x, y, 3), []

    def loss_fn(i):
        calls.append(i)
        if len(calls) == 5:  # second pass, micro-batch 1
            raise KeyboardInterrupt
        return F.cross_entropy(model(parts[i][0]), parts[i][1])
    with pytest.raises(KeyboardInterrupt):
        sam_step(model, opt, loss_fn, accumulation_steps=3)
    assert calls == [0, 1, 2, 0, 1] and not opt.perturbed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs, name", [
    (dict(accumulation_steps=0), "accumulation_steps"),
    (dict(accumulation_steps=True), "accumulation_steps"),
    (dict(accumulation_steps=2.0), "accumulation_steps"),
    (dict(clip_grad_norm=0.0), "clip_grad_norm"),
    (dict(clip_grad_norm=float("nan")), "clip_grad_norm"),
    (dict(clip_grad_norm=True), "clip_grad_norm"),
    (dict(clip_ascent=True), "clip_ascent"),
    (dict(clip_grad_norm=1.0, clip_ascent=1), "clip_ascent"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, name):
    model = make_model()
    opt = samfast.SAM(model.parameters(), **OPT)
    calls = []
    with pytest.raises(ValueError, match=name):
        sam_step(model, opt, lambda *i: calls.append(i), **kwargs)
    assert calls == []


def test_a_non_sam_optimizer_is_refused():
    model = make_model()
    with pytest.raises(TypeError, match="samfast.SAM"):
        sam_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 lambda: model(torch.zeros(1, 6, dtype=torch.float64)).sum())


# -- DDP: 2 ranks, every scenario in one spawn -----------------------------------------------------

K = 2  # micro-batches per rank
SCENARIOS = {  # name: (ascent, micro-batches per rank, clip)
    "global_k2_clip": ("global", K, 0.3),
    "local_k1": ("local", None, None),
    "local_k2": ("local", K, None),
}


def _count_allreduces(calls: list, bucket):
    calls.append(1)
    return default_hooks.allreduce_hook(None, bucket)


def _ddp_worker(rank, port, out):
    with gloo_group(rank, port):
        results = {}
        for backend in BACKENDS:
            for name, (ascent, k, clip) in SCENARIOS.items():
                model = make_model()
                ddp = DDP(model)
                allreduces = []
                ddp.register_comm_hook(allreduces, _count_allreduces)
                opt = samfast.SAM(model.parameters(), backend=backend, **OPT)
                schedule = samfast.SwitchSchedule(STEPS, sam_start=SAM_FROM)
                per_step = []
                for step in range(STEPS):
                    schedule.apply(opt, step)
                    x, y = full_batch(step)
                    xs, ys = shard(x, rank), shard(y, rank)
                    if k is None:
                        loss_fn = lambda: F.cross_entropy(ddp(xs), ys)  # noqa: E731
                    else:
                        parts = micro(xs, ys, k)
                        loss_fn = lambda i: F.cross_entropy(ddp(parts[i][0]), parts[i][1])  # noqa: E731
                    before = len(allreduces)
                    sam_step(ddp, opt, loss_fn, ascent=ascent, accumulation_steps=k,
                             clip_grad_norm=clip)
                    per_step.append(len(allreduces) - before)
                results[backend, name] = ({n: p.detach().clone() for n, p in
                                           model.state_dict().items()}, per_step)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_accumulation")
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_global_ascent_with_micro_batches_and_clip_is_the_full_batch_step(ddp_results,
                                                                             backend):
    (state0, per_step), (state1, _) = (r[backend, "global_k2_clip"] for r in ddp_results)
    assert all(torch.equal(state0[n], state1[n]) for n in state0)  # replicas bitwise equal
    reference = run_reference(clip=0.3)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state0[name], value, rtol=1e-10, atol=1e-12)
    # one all-reduce per pass (one bucket): the micro-batches before the last ran in no_sync
    assert per_step == [1] * SAM_FROM + [2] * (STEPS - SAM_FROM)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_local_ascent_with_micro_batches_is_the_shard_ascent(ddp_results, backend):
    """Local ascent: each replica's ascent gradient is its whole shard's, accumulated over
    its micro-batches without any all-reduce; the same step as without accumulation."""
    (state0, per_step), (state1, _) = (r[backend, "local_k2"] for r in ddp_results)
    one_pass, _ = ddp_results[0][backend, "local_k1"]
    assert all(torch.equal(state0[n], state1[n]) for n in state0)
    for name in state0:
        torch.testing.assert_close(state0[name], one_pass[name], rtol=1e-10, atol=1e-12)
    assert per_step == [1] * STEPS  # the ascent pass never all-reduces
