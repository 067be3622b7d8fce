"""CUDA-only checks (skipped cleanly without a GPU; run by bench/gpu_check.sh on a lent one):
parity of every CUDA backend with the ground truth, CUDA-graph capture of a whole SAM step,
bitwise run-to-run determinism, and peak memory of exactly one extra parameter-sized buffer."""

from __future__ import annotations

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


def _grads_for(model, step):
    gen = torch.Generator(device="cuda").manual_seed(step)
    return [torch.randn(p.shape, device="cuda", generator=gen) * 1e-2
            for p in model.parameters()]


@pytest.mark.parametrize("backend", FUSED)
def test_sam_step_is_cuda_graph_capturable(backend):
    """Captured once, replayed with new gradients and with lr and rho (CUDA tensors) changed
    in place between replays, as an LR scheduler does: the replays follow eager steps."""
    eager, graphed = _model(), _model()
    hyper = [(torch.tensor(0.1, device="cuda"), torch.tensor(0.05, device="cuda"))
             for _ in range(2)]
    opts = [samfast.SAM(m.parameters(), backend=backend, lr=lr, rho=rho, momentum=0.9,
                        nesterov=True) for m, (lr, rho) in zip((eager, graphed), hyper)]

    def step(model, opt, grads):
        for p, g in zip(model.parameters(), grads):
            p.grad.copy_(g)
        opt.first_step()
        for p, g in zip(model.parameters(), grads):
            p.grad.add_(g, alpha=0.5)  # "second-pass" gradient
        opt.second_step()

    for s in range(3):  # warm-up: momentum buffers exist afterwards
        for m, o in zip((eager, graphed), opts):
            step(m, o, _grads_for(m, s))
    static = _grads_for(graphed, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(graphed, opts[1], static)
    torch.cuda.current_stream().wait_stream(stream)
    # capture recorded the step without running it; replays now run it
    for s in range(3, 8):
        for lr, rho in hyper:
            lr.fill_(0.1 * 0.7 ** s)
            rho.fill_(0.05 + 0.01 * s)
        grads = _grads_for(eager, s)
        step(eager, opts[0], grads)
        for buf, g in zip(static, grads):
            buf.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
