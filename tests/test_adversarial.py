"""PGD against closed forms on linear models, invariants on random inputs, the fused Triton
step against the reference step, robust accuracy, and the model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import samfast
from samfast.adversarial import pgd_step_reference

HAS_TRITON_STEP = "triton" in samfast.available_backends("cpu") or torch.cuda.is_available()


class Linear2(nn.Module):
    """Two-class affine model on flat inputs: logits = x @ W^T + b."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(2, d, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def _inputs(n, d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (n,), generator=gen))


def test_linf_reaches_the_closed_form_worst_case_inside_the_box():
    model = Linear2(37)
    x, y = _inputs(16, 37)
    eps = 0.1
    # CE falls with the margin (w_y - w_other) . x, so the worst case moves every coordinate
    # by eps against the sign of that difference, then clips to the box [0, 1].
    d = model.w[y] - model.w[1 - y]
    worst = (x - eps * d.sign()).clamp(0, 1).detach()
    x_adv = samfast.pgd_attack(model, x, y, eps=eps, alpha=eps / 3, steps=5, norm="linf",
                               random_start=False)
    torch.testing.assert_close(x_adv, worst, rtol=0, atol=1e-12)
    for rs in (True, False):  # with a random start too: the same loss
        x_adv = samfast.pgd_attack(model, x, y, eps=eps, alpha=eps / 3, steps=8, norm="linf",
                                   random_start=rs, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(F.cross_entropy(model(x_adv), y, reduction="none"),
                                   F.cross_entropy(model(worst), y, reduction="none"))


def test_l2_with_an_inactive_box_reaches_x_plus_eps_along_the_gradient():
    model = Linear2(29, seed=3)
    x, y = _inputs(8, 29, seed=4)
    eps = 0.5
    d = (model.w[1 - y] - model.w[y]).detach()
    target = x + eps * d / d.norm(dim=1, keepdim=True)
    x_adv = samfast.pgd_attack(model, x, y, eps=eps, alpha=0.2, steps=10, norm="l2",
                               random_start=False, clamp=None)
    torch.testing.assert_close(x_adv, target, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_outputs_stay_in_the_ball_and_the_box(seed):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in torch.randint(1, 6, (3,), generator=gen))
    norm = ("linf", "l2")[seed % 2]
    eps = float(torch.rand((), generator=gen)) * (0.1 if norm == "linf" else 2.0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), 4), nn.Tanh(),
                          nn.Linear(4, 3))
    x = torch.rand(5, *shape, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    x_adv = samfast.pgd_attack(model, x, y, eps=eps, alpha=eps / 2, steps=4, norm=norm,
                               generator=gen)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-5) + 1e-7).all())
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert not x_adv.requires_grad


def _trained_cnn():
    from samfast.cifar import train as trainer
    from samfast.cifar.data import eval_batches, load_cifar, stratified_subset
    from samfast.cifar.demo import DEMO_DATA
    torch.manual_seed(0)
    model = trainer.build_model("small_cnn", 10)
    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9)
    opt.sam_enabled = False
    train, test = load_cifar(str(DEMO_DATA))
    for x, y in eval_batches(stratified_subset(train, 600), 100):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.base_step()
    return model, list(eval_batches(stratified_subset(test, 120), 60))


def test_attack_raises_the_loss_robust_acc_le_clean_and_is_reproducible():
    model, batches = _trained_cnn()
    x, y = batches[0]
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
    x_adv = samfast.pgd_attack(model, x, y, eps=4 / 255, alpha=1 / 255, steps=5,
                               random_start=False)
    with torch.no_grad():
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert float(adv.mean()) > float(clean.mean())
    assert float((adv >= clean - 1e-6).float().mean()) >= 0.95
    with torch.no_grad():
        clean_acc = 100 * sum(int((model(a).argmax(1) == b).sum()) for a, b in batches) / 120
    robust = samfast.robust_accuracy(model, batches, eps=4 / 255, alpha=1 / 255, steps=5, seed=3)
    assert robust <= clean_acc
    assert robust == samfast.robust_accuracy(model, batches, eps=4 / 255, alpha=1 / 255,
                                             steps=5, seed=3)


@pytest.mark.parametrize("train_mode", [False, True])
def test_model_is_left_exactly_as_it_was(train_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model.train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    samfast.pgd_attack(model, x, y, steps=3, train_mode=train_mode)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())


@pytest.mark.skipif(not HAS_TRITON_STEP, reason="needs Triton (GPU or interpreter)")
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 3, 9, 11), (2, 3, 32, 32)])
def test_fused_triton_step_matches_the_reference(norm, shape):
    from samfast.kernels.pgd import pgd_step
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=gen)
    x_adv = (x + 0.05 * torch.randn(shape, generator=gen)).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    g.view(-1)[0] = 0.0  # sign(0) = 0
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    want = pgd_step_reference(x_adv, g, x, eps, alpha, norm, 0.0, 1.0)
    got = pgd_step(x_adv, g, x, eps, alpha, norm, 0.0, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, name", [(dict(norm="l1"), "norm"), (dict(eps=-1), "eps"),
                                          (dict(steps=-1), "steps"), (dict(clamp=(1, 0)), "clamp")])
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        samfast.pgd_attack(nn.Linear(3, 2), torch.rand(2, 3), torch.tensor([0, 1]), **kwargs)
