"""The torch.optim contract of samfast.SAM: styles, state, skips, checkpoints, misuse."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import samfast

BACKENDS = samfast.available_backends("cpu")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 7), nn.Linear(7, 3))


def batch(step: int, n: int = 6):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 7, 7, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None, buffers: bool = True):
    source = model.state_dict() if buffers else dict(model.named_parameters())
    weights = {k: v.detach().clone() for k, v in source.items()}
    state = copy.deepcopy(opt.state_dict()) if opt is not None else None
    return weights, state


def assert_same_tree(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def explicit_step(model, opt, x, y) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    with samfast.running_stats_disabled(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss


def closure_step(model, opt, x, y) -> torch.Tensor:
    def closure():
        opt.zero_grad()
        with samfast.running_stats_disabled(model, enabled=opt.perturbed):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return opt.step(closure)


def sgd_kwargs():
    return dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


# -- the two styles and the base phase ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_and_explicit_styles_are_bitwise_identical(backend):
    models = [make_model(), make_model()]
    opts = [samfast.SAM(m.parameters(), rho=0.1, backend=backend, **sgd_kwargs()) for m in models]
    for step in range(4):
        x, y = batch(step)
        l1 = explicit_step(models[0], opts[0], x, y)
        l2 = closure_step(models[1], opts[1], x, y)
        assert torch.equal(l1, l2)
    assert_same_tree(snapshot(models[0], opts[0]), snapshot(models[1], opts[1]))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_disabled_is_exactly_the_base_optimizer(backend, base):
    base_cls, kw = ((torch.optim.SGD, sgd_kwargs()) if base == "sgd"
                    else (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)))
    m_sam, m_base = make_model(), make_model()
    opt = samfast.SAM(m_sam.parameters(), base_optimizer=base_cls, backend=backend, **kw)
    opt.sam_enabled = False
    ref = base_cls(m_base.parameters(), **kw)
    for step in range(5):
        x, y = batch(step)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m_sam(x), y)
            loss.backward()
            return loss
        if step % 2:
            opt.step(closure)
        else:
            closure()
            opt.base_step(zero_grad=True)
        ref.zero_grad()
        F.cross_entropy(m_base(x), y).backward()
        ref.step()
    if backend == "reference":  # the base optimizer's own code runs: bit for bit
        assert_same_tree(snapshot(m_sam)[0], snapshot(m_base)[0])
        assert_same_tree(opt.base_optimizer.state_dict()["state"], ref.state_dict()["state"])
    else:  # fused kernels: same maths and order, but the compiler's rounding (FMA) may differ
        torch.testing.assert_close(snapshot(m_sam)[0], snapshot(m_base)[0])
        torch.testing.assert_close(opt.state_dict()["state"], ref.state_dict()["state"])


def test_closure_step_runs_two_passes_only_when_enabled():
    model = make_model()
    opt = samfast.SAM(model.parameters(), lr=0.1)
    calls = []

    def closure():
        calls.append(opt.perturbed)
        opt.zero_grad()
        loss = F.cross_entropy(model(batch(0)[0]), batch(0)[1])
        loss.backward()
        return loss
    opt.step(closure)
    assert calls == [False, True]
    opt.sam_enabled = False
    calls.clear()
    opt.step(closure)
    assert calls == [False]


def test_param_groups_and_state_are_the_base_optimizers():
    model = make_model()
    opt = samfast.SAM(model.parameters(), lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    extra = nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [extra], "rho": 0.3, "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.3 and opt.param_groups[1]["momentum"] == 0.9
    assert opt.param_groups[1]["adaptive"] is False


def test_asam_usam_and_available_backends():
    p = [nn.Parameter(torch.randn(3))]
    asam = samfast.ASAM(p, lr=0.1, eta=0.01)
    usam = samfast.USAM(p, lr=0.1)
    assert asam.param_groups[0]["adaptive"] and asam.param_groups[0]["eta"] == 0.01
    assert asam.param_groups[0]["rho"] == 2.0
    assert usam.param_groups[0]["normalize"] is False
    assert "reference" in samfast.available_backends()
    assert "reference" in samfast.available_backends("cpu")
    assert samfast.SAM(p, lr=0.1, backend="reference").backend == "reference"
    assert samfast.SAM(p, lr=0.1).backend in samfast.available_backends("cpu")


# -- non-finite gradients -----------------------------------------------------------------------

def _poison(model: nn.Module, value: float) -> None:
    p = list(model.parameters())[-2]
    p.grad.view(-1)[3] = value


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("which", ["first", "second", "base"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gradient_skips_step_and_changes_nothing(backend, which, value):
    model = make_model()
    opt = samfast.SAM(model.parameters(), backend=backend, **sgd_kwargs())
    explicit_step(model, opt, *batch(0))  # momentum buffers exist
    before = snapshot(model, opt, buffers=False)  # the forward passes do move BN buffers
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    if which == "base":
        _poison(model, value)
        opt.base_step(zero_grad=True)
    else:
        if which == "first":
            _poison(model, value)
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        if which == "second":
            _poison(model, value)
        opt.second_step(zero_grad=True)
    assert opt.skipped_steps == 1
    after = snapshot(model, opt, buffers=False)
    before[1]["samfast"]["skipped_steps"] = 1
    assert_same_tree(before, after)
    explicit_step(model, opt, *batch(2))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_closure_step_runs_one_pass():
    model = make_model()
    opt = samfast.SAM(model.parameters(), lr=0.1)
    passes = []

    def closure():
        passes.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(batch(0)[0]), batch(0)[1]) * float("nan")
        loss.backward()
        return loss
    before = snapshot(model, buffers=False)
    opt.step(closure)
    assert len(passes) == 1 and opt.skipped_steps == 1
    assert_same_tree(before, snapshot(model, buffers=False))


# -- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resume_is_bitwise_identical(tmp_path, backend, base):
    base_cls, kw = ((torch.optim.SGD, sgd_kwargs()) if base == "sgd"
                    else (functools.partial(torch.optim.AdamW, eps=1e-6), dict(lr=1e-2)))

    def build():
        model = make_model()
        opt = samfast.SAM(model.parameters(), base_optimizer=base_cls, rho=0.07,
                          backend=backend, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    model, opt, sched = build()
    for step in range(10):
        explicit_step(model, opt, *batch(step))
        sched.step()
    opt.sam_enabled = step % 2 == 0
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)

    model2, opt2, sched2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == 0.07 and opt2.sam_enabled == opt.sam_enabled
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for step in range(10, 20):
        for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
            o.sam_enabled = step % 3 != 0
            closure_step(m, o, *batch(step))
            s.step()
    assert_same_tree(snapshot(model, opt), snapshot(model2, opt2))


def test_state_dict_between_passes_raises():
    model = make_model()
    opt = samfast.SAM(model.parameters(), lr=0.1)
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.load_state_dict({})


def test_state_dict_carries_samfast_options():
    opt = samfast.SAM([nn.Parameter(torch.randn(3))], lr=0.1, rho=0.2, adaptive=True, eta=0.1)
    opt.skipped_steps, opt.sam_enabled = 3, False
    sd = opt.state_dict()
    assert sd["samfast"] == {"format": 1, "sam_enabled": False, "skipped_steps": 3}
    g = sd["param_groups"][0]
    assert (g["rho"], g["adaptive"], g["eta"], g["normalize"], g["sam_eps"]) == (
        0.2, True, 0.1, True, 1e-12)


# -- misuse -------------------------------------------------------------------------------------

def _params():
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("kwargs, name", [
    (dict(rho=-0.1), "rho"), (dict(rho=float("nan")), "rho"), (dict(rho="0.05"), "rho"),
    (dict(rho=float("inf")), "rho"), (dict(eta=-1.0), "eta"), (dict(eps=-1e-12), "eps"),
    (dict(adaptive=1), "adaptive"), (dict(normalize="yes"), "normalize"),
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=float("inf")), "lr"),
        (dict(momentum=float("nan")), "momentum"), (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(maximize=True), "maximize"),
    (dict(backend="cuda-magic"), "backend"), (dict(backend=3), "backend"),
])
def test_invalid_hyper_parameters_raise_at_construction(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        samfast.SAM(_params(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("rho", [torch.tensor(-0.1), torch.tensor([0.05, 0.05]),
                                 torch.tensor(float("nan")), torch.tensor(1),
                                 torch.tensor(0.05, requires_grad=True)],
                         ids=["negative", "two-elements", "nan", "integer", "requires-grad"])
def test_invalid_tensor_rho_raises_at_construction(rho):
    with pytest.raises(ValueError, match="rho"):
        samfast.SAM(_params(), lr=0.1, rho=rho)


def test_invalid_group_options_raise():
    with pytest.raises(ValueError, match="rho"):
        samfast.SAM([{"params": _params(), "rho": -1.0}], lr=0.1)
    opt = samfast.SAM(_params(), lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "eta": -0.5})
    assert len(opt.param_groups) == 1


def test_invalid_base_optimizer_raises():
    with pytest.raises(TypeError, match="base_optimizer"):
        samfast.SAM(_params(), base_optimizer=torch.optim.SGD(_params(), lr=0.1))
    with pytest.raises(TypeError, match="base_optimizer"):
        samfast.SAM(_params(), base_optimizer="sgd")
    with pytest.raises(ValueError, match="base_optimizer.*'rho'"):
        samfast.SAM(_params(), base_optimizer=torch.optim.Adadelta)


def test_complex_and_sparse_params_raise():
    with pytest.raises(ValueError, match="complex"):
        samfast.SAM([nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=0.1)
    with pytest.raises(ValueError, match="sparse"):
        samfast.SAM([torch.randn(3, 3).to_sparse().requires_grad_()], lr=0.1)
    p = nn.Parameter(torch.randn(3, 3))
    opt = samfast.SAM([p], lr=0.1)
    p.grad = torch.randn(3, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()


def test_step_order_misuse_raises():
    model = make_model()
    opt = samfast.SAM(model.parameters(), lr=0.1)
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.base_step()
    opt.second_step()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    with pytest.raises(TypeError, match="sam_enabled"):
        opt.sam_enabled = 1


def test_closure_misuse_raises():
    model = make_model()
    opt = samfast.SAM(model.parameters(), lr=0.1)
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="computed no gradients in the first pass"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    F.cross_entropy(model(x), y).backward()  # the first pass: the closure runs at w + e only
    with pytest.raises(RuntimeError, match="computed no gradients in the second pass"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert not opt.perturbed
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))

    def returns_none():  # as torch.optim allows: the step returns what the closure returned
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
    assert opt.step(returns_none) is None


# -- BatchNorm ----------------------------------------------------------------------------------

def test_running_stats_untouched_in_second_pass():
    model = make_model()
    bn = model[1]
    opt = samfast.SAM(model.parameters(), lr=0.1)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    samfast.disable_running_stats(model)
    samfast.disable_running_stats(model)  # idempotent
    out = model(x)
    assert_same_tree(stats, dict(bn.state_dict()))
    # the second pass still normalizes with the batch statistics, as in training
    model.eval()
    assert not torch.allclose(out, model(x))
    model.train()
    samfast.enable_running_stats(model)
    assert bn.track_running_stats is True
    model(x)
    assert not torch.equal(stats["running_mean"], bn.running_mean)
    assert int(bn.num_batches_tracked) == int(stats["num_batches_tracked"]) + 1


def test_running_stats_context_manager_restores_and_can_be_off():
    model = make_model()
    bn = model[1]
    with samfast.running_stats_disabled(model, enabled=False):
        assert bn.track_running_stats
    with pytest.raises(KeyError):
        with samfast.running_stats_disabled(model):
            assert not bn.track_running_stats
            raise KeyError
    assert bn.track_running_stats


def test_works_without_the_compiled_extension():
    """samfast imports and trains when samfast._C is missing: "auto" falls back to the
    reference backend, and asking for "native" says why it is unavailable."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["samfast._C"] = None  # makes `import samfast._C` fail, as without a build
import torch, samfast
assert "native" not in samfast.available_backends("cpu"), samfast.available_backends("cpu")
p = torch.nn.Parameter(torch.randn(3))
opt = samfast.SAM([p], lr=0.1)
assert opt.backend == "reference", opt.backend
p.grad = torch.ones(3); opt.first_step(); p.grad = torch.ones(3); opt.second_step()
try:
    samfast.SAM([p], lr=0.1, backend="native")
except ValueError as exc:
    assert "not built" in str(exc), exc
else:
    raise AssertionError("native should be unavailable")
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "SAMFAST_JIT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# -- tensor hyper-parameters (what CUDA graphs need: the kernels read them on the device) ------

def _run_with(backend, lr, rho, normalize, scheduler=False, steps=4):
    model = make_model()
    opt = samfast.SAM(model.parameters(), backend=backend, lr=lr, rho=rho, normalize=normalize,
                      momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler else None
    for step in range(steps):
        closure_step(model, opt, *batch(step))
        if sched is not None:
            sched.step()
    return model, opt


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
@pytest.mark.parametrize("normalize", [True, False], ids=["sam", "usam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_rho_give_the_float_results(backend, normalize, shape):
    """lr and rho as one-element tensors (fp64, as an LR scheduler leaves them) train exactly
    as the same floats; a scheduler's in-place updates of the tensor lr are seen by every
    step."""
    for scheduler in (False, True):
        want, _ = _run_with(backend, 0.05, 0.1, normalize, scheduler)
        lr = torch.full(shape, 0.05, dtype=torch.float64)
        got, opt = _run_with(backend, lr, torch.full(shape, 0.1, dtype=torch.float64),
                             normalize, scheduler)
        assert opt.param_groups[0]["lr"] is lr  # updated in place, not replaced
        if scheduler:
            assert float(lr) == 0.05 * 0.5 ** 4
        for a, b in zip(want.parameters(), got.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

