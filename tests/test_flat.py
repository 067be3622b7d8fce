"""Flat buffers under what users do: the fused backends must stay equal to the reference
backend when grads are replaced, state is loaded, dtypes are mixed, layers are frozen, the
model is compiled, and checkpoints move between backends."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import samfast

FUSED = [b for b in samfast.available_backends("cpu") if b != "reference"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend on this machine")


class Net(nn.Sequential):
    """A small CNN plus ``unused_head``, which the forward pass never reaches (grad None)."""

    def forward(self, x):
        for name, module in self.named_children():
            if name != "unused_head":
                x = module(x)
        return x


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    # no conv bias before BN: its gradient is pure rounding noise, which AdamW would amplify
    model = Net(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 5 * 5, 9), nn.ReLU(), nn.Linear(9, 3))
    model.unused_head = nn.Linear(9, 4)
    return model.to(dtype)


def batch(step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(500 + step)
    return (torch.randn(8, 3, 7, 7, generator=gen).to(dtype),
            torch.randint(0, 3, (8,), generator=gen))


def sam_step(model, opt, step, zero=None, dtype=torch.float32):
    x, y = batch(step, dtype)
    zero = zero or (lambda: opt.zero_grad())
    zero()
    F.cross_entropy(model(x).float(), y).backward()
    opt.first_step()
    zero()
    with samfast.running_stats_disabled(model):
        F.cross_entropy(model(x).float(), y).backward()
    opt.second_step()


def padded_numel(model) -> int:
    """Flat-buffer length: each param padded to a multiple of ALIGN elements."""
    from samfast.flat import ALIGN
    return sum(-(-p.numel() // ALIGN) * ALIGN for p in model.parameters())


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_models_close(a, b, **tol):
    pa, pb = params_of(a), params_of(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], msg=lambda m: f"{k}: {m}", **tol)


def train_pair(backend, steps=4, zero=None, **kw):
    models = [make_model(), make_model()]
    opts = [samfast.SAM(m.parameters(), backend=b, lr=0.05, momentum=0.9, weight_decay=1e-3,
                        **kw) for m, b in zip(models, ("reference", backend))]
    for step in range(steps):
        for m, o in zip(models, opts):
            sam_step(m, o, step, zero=(lambda m=m: zero(m)) if zero else None)
    return models, opts


@pytest.mark.parametrize("backend", FUSED)
def test_params_and_grads_are_views_into_flat_buffers(backend):
    model = make_model()
    before = params_of(model)
    opt = samfast.SAM(model.parameters(), backend=backend, lr=0.1, momentum=0.9)
    bucket = opt._backend.buckets[0]
    assert bucket.param.numel() == padded_numel(model) and len(opt._backend.buckets) == 1
    for p, name in zip(model.parameters(), before):
        assert p.untyped_storage().data_ptr() == bucket.param.untyped_storage().data_ptr()
        assert p.grad is None  # as torch: no gradient before a backward
        assert torch.equal(p.detach(), before[name])
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        if p.grad is not None:  # a backward's gradient lands in the flat buffer
            assert p.grad.untyped_storage().data_ptr() == bucket.grad.untyped_storage().data_ptr()
    assert model.unused_head.weight.grad is None
    opt.zero_grad()
    sam_step(model, opt, 0)
    assert all(opt.state[p]["momentum_buffer"].untyped_storage().data_ptr()
               == bucket.momentum.untyped_storage().data_ptr()
               for p in model.parameters() if p is not model.unused_head.weight
               and p is not model.unused_head.bias)


@pytest.mark.parametrize("backend", FUSED)
def test_memory_overhead_is_one_parameter_sized_buffer(backend):
    """Over SGD with momentum (params + grads + momentum), SAM adds exactly the backup."""
    model = make_model()
    opt = samfast.SAM(model.parameters(), backend=backend, lr=0.1, momentum=0.9)
    sam_step(model, opt, 0)
    n = padded_numel(model)
    bucket = opt._backend.buckets[0]
    buffers = [bucket.param, bucket.grad, bucket.momentum, bucket.backup]
    assert [b.numel() for b in buffers] == [n] * 4
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 4


@pytest.mark.parametrize("backend", FUSED)
def test_unused_head_is_neither_perturbed_nor_stepped(backend):
    (ref, fused), (_, opt) = train_pair(backend)
    head = make_model().unused_head
    assert torch.equal(fused.unused_head.weight, head.weight)
    assert fused.unused_head.weight not in opt.state or not opt.state[fused.unused_head.weight]
    assert_models_close(ref, fused)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("backend", FUSED)
def test_model_zero_grad_keeps_the_fast_path(backend, set_to_none):
    """model.zero_grad() instead of opt.zero_grad(): backward's gradients still land in the
    flat buffer without the copy path (no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ref, fused), _ = train_pair(backend, zero=lambda m: m.zero_grad(set_to_none=set_to_none))
    assert_models_close(ref, fused)


@pytest.mark.parametrize("backend", FUSED)
def test_assigned_grads_are_copied_with_one_warning(backend):
    def assign(m):
        m.zero_grad()
        for p in m.parameters():
            p.grad = torch.zeros_like(p)  # replaced by backward's accumulation below
    with pytest.warns(UserWarning, match="copied into it"):
        (ref, fused), _ = train_pair(backend, zero=assign)
    assert_models_close(ref, fused)


@pytest.mark.parametrize("reassign_data", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_model_load_state_dict_mid_training(backend, reassign_data):
    """load_state_dict copies into the views; ``p.data = ...`` (done by some utilities)
    swaps the storage behind the optimizer's back and is adopted again on the next step.
    (``load_state_dict(assign=True)`` replaces the Parameter objects themselves, which no
    torch optimizer survives: build the optimizer after it.)"""
    (ref, fused), opts = train_pair(backend, steps=2)
    other = make_model(seed=1).state_dict()
    for m in (ref, fused):
        m.load_state_dict(other)
        if reassign_data:
            for p in m.parameters():
                p.data = p.data.clone()
    for step in range(2, 5):
        for m, o in zip((ref, fused), opts):
            sam_step(m, o, step)
    assert_models_close(ref, fused)
    bucket = opts[1]._backend.buckets[0]
    assert fused[0].weight.untyped_storage().data_ptr() == bucket.param.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", FUSED)
def test_frozen_then_unfrozen_layer(backend):
    models = [make_model(), make_model()]
    for m in models:
        m[0].weight.requires_grad_(False)
    opts = [samfast.SAM(m.parameters(), backend=b, lr=0.05, momentum=0.9)
            for m, b in zip(models, ("reference", backend))]
    for step in range(5):
        if step == 2:
            for m in models:
                m[0].weight.requires_grad_(True)
        for m, o in zip(models, opts):
            sam_step(m, o, step)
    assert not torch.equal(models[1][0].weight, make_model()[0].weight)
    assert_models_close(*models)


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_dtypes_in_one_model(backend):
    models = [make_model(), make_model()]
    for m in models:
        m[4].to(torch.float64)
        m[6].to(torch.bfloat16)

    def forward(m, x):
        h = m[3](m[2](m[1](m[0](x))))
        h = F.relu(m[4](h.double()))
        return m[6](h.bfloat16()).float()

    opts = [samfast.SAM(m.parameters(), backend=b, lr=0.05, momentum=0.9)
            for m, b in zip(models, ("reference", backend))]
    assert len(opts[1]._backend.buckets) == 3
    for step in range(3):
        x, y = batch(step)
        for m, o in zip(models, opts):
            o.zero_grad()
            F.cross_entropy(forward(m, x), y).backward()
            o.first_step(zero_grad=True)
            F.cross_entropy(forward(m, x), y).backward()
            o.second_step()
    # The bf16 layer rounds activations, so a last-bit difference in N (summation order)
    # can flip a bf16 rounding and reach every layer: looser tolerances than elsewhere.
    for (k, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        tol = (dict(rtol=2e-2, atol=2e-2) if a.dtype == torch.bfloat16
               else dict(rtol=1e-3, atol=1e-4))
        torch.testing.assert_close(a, b, msg=lambda msg: f"{k}: {msg}", **tol)


@pytest.mark.parametrize("backend", FUSED)
def test_channels_last_params_keep_their_layout(backend):
    model = make_model().to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    ref = make_model().to(memory_format=torch.channels_last)
    opt = samfast.SAM(model.parameters(), backend=backend, lr=0.05, momentum=0.9)
    ref_opt = samfast.SAM(ref.parameters(), backend="reference", lr=0.05, momentum=0.9)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for step in range(3):
        sam_step(model, opt, step)
        sam_step(ref, ref_opt, step)
    assert model[0].weight.grad.stride() == model[0].weight.stride()
    assert_models_close(ref, model)


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_model_writes_grads_into_the_flat_buffer(backend):
    models = [make_model(), make_model()]
    opts = [samfast.SAM(m.parameters(), backend=b, lr=0.05, momentum=0.9)
            for m, b in zip(models, ("reference", backend))]
    compiled = torch.compile(models[1], backend="aot_eager")
    for step in range(3):
        sam_step(models[0], opts[0], step)
        x, y = batch(step)
        opts[1].zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opts[1].first_step(zero_grad=True)
        with samfast.running_stats_disabled(models[1]):
            F.cross_entropy(compiled(x), y).backward()
        opts[1].second_step(zero_grad=True)
    assert_models_close(*models)
    assert all(p.grad is None for p in models[1].parameters())  # zero_grad set them to None


@pytest.mark.parametrize("direction", ["to_reference", "from_reference"])
@pytest.mark.parametrize("backend", FUSED)
def test_state_dict_moves_between_backends(tmp_path, backend, direction):
    first, second = ((backend, "reference") if direction == "to_reference"
                     else ("reference", backend))
    model = make_model()
    opt = samfast.SAM(model.parameters(), backend=first, lr=0.05, momentum=0.9, nesterov=True)
    for step in range(4):
        sam_step(model, opt, step)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)

    resumed = make_model(seed=3)
    resumed.load_state_dict(ckpt["model"])
    opt2 = samfast.SAM(resumed.parameters(), backend=second, lr=0.05, momentum=0.9,
                       nesterov=True)
    opt2.load_state_dict(ckpt["opt"])
    for step in range(4, 8):
        sam_step(model, opt, step)
        sam_step(resumed, opt2, step)
    assert_models_close(model, resumed)
    if second != "reference":  # the loaded momentum was adopted into the flat buffer
        bucket = opt2._backend.buckets[0]
        p = resumed[0].weight
        assert opt2.state[p]["momentum_buffer"].untyped_storage().data_ptr() == \
            bucket.momentum.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", FUSED)
def test_same_backend_resume_is_bitwise(tmp_path, backend):
    def build():
        m = make_model()
        return m, samfast.SAM(m.parameters(), backend=backend, lr=0.05, momentum=0.9)
    model, opt = build()
    for step in range(3):
        sam_step(model, opt, step)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    model2, opt2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for step in range(3, 6):
        sam_step(model, opt, step)
        sam_step(model2, opt2, step)
    assert_models_close(model, model2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_non_sgd_base_uses_restore_then_its_own_step(backend):
    models = [make_model(), make_model()]
    opts = [samfast.SAM(m.parameters(), base_optimizer=torch.optim.AdamW, backend=b, lr=1e-2)
            for m, b in zip(models, ("reference", backend))]
    for step in range(4):
        for m, o in zip(models, opts):
            sam_step(m, o, step)
    assert_models_close(*models)


@pytest.mark.parametrize("backend", FUSED)
def test_add_param_group_after_construction(backend):
    models = [make_model(), make_model()]
    opts = []
    for m, b in zip(models, ("reference", backend)):
        body = [p for n, p in m.named_parameters() if not n.startswith("6.")]
        opt = samfast.SAM(body, backend=b, lr=0.05, momentum=0.9)
        opt.add_param_group({"params": list(m[6].parameters()), "rho": 0.2, "lr": 0.01})
        opts.append(opt)
    for step in range(3):
        for m, o in zip(models, opts):
            sam_step(m, o, step)
    assert_models_close(*models)


def test_param_moved_after_construction_raises():
    model = make_model()
    opt = samfast.SAM(model.parameters(), backend=FUSED[0], lr=0.1)
    model[0].weight.data = model[0].weight.data.double()
    F.cross_entropy(model[1:](model[0](batch(0)[0].double()).float()), batch(0)[1]).backward()
    with pytest.raises(RuntimeError, match="build the optimizer after model.to"):
        opt.first_step()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("policy, extra", [
    (lambda: None, 0),
    (lambda: samfast.Interval(2), 0),
    (lambda: samfast.RandomSwitch(0.5, seed=3), 0),
    (lambda: samfast.AdaptiveSAM(total_steps=8, lambda1=3.0, lambda2=3.0), 0),
    (lambda: samfast.LookSAM(k=2, alpha=0.2), 1),
])
def test_memory_of_each_policy(backend, policy, extra):
    """The README's memory table: over SAM's four flat buffers (param, grad, momentum, backup)
    LookSAM adds exactly one more parameter-sized buffer (g_v), the other policies none; each
    buffer's storage is exactly the padded size (what the table multiplies by 4 bytes)."""
    model = make_model()
    opt = samfast.SAM(model.parameters(), backend=backend, lr=0.1, momentum=0.9,
                      policy=policy())

    def closure():
        F.cross_entropy(model(x), y).backward()
        return torch.zeros(())
    for step in range(4):  # full and one-pass steps both
        x, y = batch(step)
        opt.zero_grad()
        opt.step(closure)
    n = padded_numel(model)
    (bucket,) = opt._backend.buckets
    buffers = [bucket.param, bucket.grad, bucket.momentum, bucket.backup]
    buffers += [bucket.gv] if bucket.gv is not None else []
    assert [b.numel() for b in buffers] == [n] * (4 + extra)
    assert [b.untyped_storage().nbytes() for b in buffers] == [4 * n] * (4 + extra)
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 4 + extra
    if opt.policy is None:
        assert opt.counters["sam_steps"] == 4
    else:
        assert opt.counters["sam_steps"] not in (0, 4)  # the policy took both kinds of step
