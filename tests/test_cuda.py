"""CUDA-only checks (skipped cleanly without a GPU; run by bench/gpu_check.sh on a lent one):
parity of every CUDA backend with the ground truth, CUDA-graph capture of a whole SAM step
(forward and backward included) and of an optimizer's very first step, a fused AdamW base
skipping on the device, params on a second device, bitwise run-to-run determinism, and peak
memory of exactly one extra parameter-sized buffer."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import samfast
from ground_truth import GTGroup
from problems import SIZES, assert_matches_ground_truth, make_problem, run_samfast, seed_for

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA_BACKENDS = samfast.available_backends("cuda") if torch.cuda.is_available() else []
FUSED = [b for b in CUDA_BACKENDS if b != "reference"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("variant", [dict(), dict(adaptive=True, rho=0.5, eta=0.01),
                                     dict(normalize=False, rho=0.02)], ids=["sam", "asam", "usam"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_matches_ground_truth(backend, variant, dtype):
    group = GTGroup(params=list(range(len(SIZES))), momentum=0.9, nesterov=True,
                    weight_decay=5e-4, **variant)
    problem = make_problem(seed_for(f"cuda{backend}{variant}{dtype}"), [group])
    params, opt = run_samfast(problem, dtype, "sgd", backend, device="cuda")
    assert opt.skipped_steps == 0
    assert_matches_ground_truth([p.cpu() for p in params], problem, dtype)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 30 * 30, 10)).cuda()


def _batch(step: int, n: int = 16):
    gen = torch.Generator(device="cuda").manual_seed(step)
    return (torch.randn(n, 3, 32, 32, device="cuda", generator=gen),
            torch.randint(0, 10, (n,), device="cuda", generator=gen))


def _sam_step(model, opt, x, y):
    """A whole SAM step as training runs it: both passes' backward fill the grads (each
    gradient copied into the flat buffer by the post-accumulate-grad hook)."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    opt.zero_grad(set_to_none=True)
    with samfast.running_stats_disabled(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step()


@pytest.mark.parametrize("backend", FUSED)
def test_whole_sam_step_is_cuda_graph_capturable(backend):
    """Forward, backward, ascent, forward, backward, descent captured once (after eager
    warm-up on a side stream, as torch.cuda.graphs asks) and replayed with new data and with
    lr and rho (CUDA tensors) changed in place between replays, as an LR scheduler does: the
    replays follow eager steps bit for bit."""
    eager, graphed = _model(), _model()
    hyper = [(torch.tensor(0.1, device="cuda"), torch.tensor(0.05, device="cuda"))
             for _ in range(2)]
    opts = [samfast.SAM(m.parameters(), backend=backend, lr=lr, rho=rho, momentum=0.9,
                        nesterov=True) for m, (lr, rho) in zip((eager, graphed), hyper)]
    static_x, static_y = _batch(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in range(3):  # warm-up: momentum buffers exist and kernels are compiled after it
            x, y = _batch(s)
            _sam_step(eager, opts[0], x, y)
            static_x.copy_(x)
            static_y.copy_(y)
            _sam_step(graphed, opts[1], static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _sam_step(graphed, opts[1], static_x, static_y)
    for s in range(3, 8):  # capture recorded the step without running it; replays run it
        for lr, rho in hyper:
            lr.fill_(0.1 * 0.7 ** s)
            rho.fill_(0.05 + 0.01 * s)
        x, y = _batch(s)
        _sam_step(eager, opts[0], x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_first_optimizer_step_is_capturable(backend):
    """No host sync and no host-to-device copy even in the step that creates the momentum
    buffers and their device 'started' flags: a fresh optimizer's first steps captured (the
    kernels compiled beforehand by another optimizer), with gradients assigned to static
    tensors, replayed against eager steps."""
    warm = _model()
    warm_opt = samfast.SAM(warm.parameters(), backend=backend, lr=0.1, momentum=0.9)
    _sam_step(warm, warm_opt, *_batch(0))  # compiles the kernels outside the capture
    eager, graphed = _model(), _model()
    opts = [samfast.SAM(m.parameters(), backend=backend, lr=0.1, momentum=0.9)
            for m in (eager, graphed)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    static = [torch.randn(p.shape, device="cuda", generator=gen) for p in graphed.parameters()]
    for p, g in zip(graphed.parameters(), static):
        p.grad = g  # assigned by hand: copied into the flat buffer at each (replayed) step

    def steps(opt):
        opt.first_step()
        opt.second_step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps(opts[1])
    for s in range(4):
        grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in eager.parameters()]
        for p, g in zip(eager.parameters(), grads):
            p.grad = g.clone()
        steps(opts[0])
        for buf, g in zip(static, grads):
            buf.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_adamw_base_skips_on_the_device():
    """A non-finite gradient with a fused AdamW base (fused=True takes the skip flag as
    found_inf, as from GradScaler): the step is skipped with no host sync and no warning,
    and the run equals the reference backend's."""
    import warnings
    results = []
    for backend in ("reference", FUSED[0] if FUSED else "reference"):
        model = _model()
        opt = samfast.SAM(model.parameters(), backend=backend, lr=1e-3,
                          base_optimizer=functools.partial(torch.optim.AdamW, fused=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "one CUDA sync per step" warning
            for s in range(4):
                x, y = _batch(s)
                if s == 2:
                    x[0, 0, 0, 0] = float("nan")
                _sam_step(model, opt, x, y)
        assert opt.skipped_steps == 1
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", FUSED)
def test_params_on_the_second_device(backend):
    """Params on cuda:1 with cuda:0 current: every launch runs under the params' device."""
    torch.cuda.set_device(0)
    models = [_model().to("cuda:1"), _model().to("cuda:1")]
    opts = [samfast.SAM(m.parameters(), backend=b, lr=0.1, momentum=0.9)
            for m, b in zip(models, ("reference", backend))]
    for s in range(3):
        x, y = (t.to("cuda:1") for t in _batch(s))
        for m, o in zip(models, opts):
            _sam_step(m, o, x, y)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic_run_to_run(backend):
    results = []
    for _ in range(2):
        model = _model()
        opt = samfast.SAM(model.parameters(), backend=backend, lr=0.1, momentum=0.9)
        x = torch.randn(16, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        y = torch.arange(16, device="cuda") % 10
        for _ in range(5):
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", FUSED)
def test_memory_is_one_extra_parameter_buffer(backend):
    """Steady state: SAM holds exactly one parameter-sized buffer (the backup) more than SGD
    with momentum; a step allocates nothing beyond small partial-sum scratch."""
    def measure(sam: bool):
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)]).cuda()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = (samfast.SAM(model.parameters(), backend=backend, lr=0.1, momentum=0.9) if sam
               else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True))
        step = (lambda: (opt.first_step(), opt.second_step())) if sam else opt.step
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - before
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        total = torch.cuda.memory_allocated() - start
        del model, opt, step
        return total, transient, params
    sgd_total, _, params = measure(False)
    sam_total, sam_transient, _ = measure(True)
    assert abs(sam_total - sgd_total - params) <= 1 << 20, (sam_total, sgd_total, params)
    assert sam_transient <= 1 << 20, sam_transient
