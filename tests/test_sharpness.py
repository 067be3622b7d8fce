"""Hessian eigenvalues and trace against exact Hessians and known spectra."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import samfast


def exact_hessian(model: nn.Module, loss_fn, batches) -> torch.Tensor:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                      if p.requires_grad])
    total = sum(len(y) for _, y in batches)

    def loss_of(w):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = shape.numel()
            params[name] = w[offset:offset + n].view(shape)
            offset += n
        return sum(loss_fn(functional_call(model, params, (x,)), y) * len(y) / total
                   for x, y in batches)
    return torch.autograd.functional.hessian(loss_of, flat)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def small_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()


def batches_for(shape, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


@pytest.mark.parametrize("make, shape", [(mlp, (5,)), (small_cnn, (2, 6, 6))],
                         ids=["mlp", "cnn"])
def test_top3_match_exact_hessian(make, shape):
    model = make()
    batches = batches_for(shape, [7, 5])
    n = sum(p.numel() for p in model.parameters())
    assert 50 < n < 400
    exact = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, batches)).flip(0)[:3]
    eigs, info = samfast.hessian_eigenvalues(model, F.cross_entropy, batches, k=3,
                                             max_iter=n, tol=1e-12, return_info=True)
    assert eigs.dtype == torch.float64 and eigs.device.type == "cpu"
    torch.testing.assert_close(eigs, exact, rtol=1e-6, atol=0)
    assert info.hvps == info.iterations <= n


class Quadratic(nn.Module):
    """loss = 0.5 w^T A w with a chosen spectrum (A = Q diag(lam) Q^T)."""

    def __init__(self, lam: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=gen, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(lam) @ q.T)
        self.w = nn.Parameter(torch.randn(len(lam), generator=gen, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.w @ self.a @ self.w + 0 * x.sum()


def value_loss(out, y):
    return out


def test_known_spectrum_with_negatives_and_a_near_degenerate_top_pair():
    lam = torch.cat([torch.tensor([10.0, 10.0 - 1e-4, 4.0], dtype=torch.float64),
                     torch.linspace(-3, 2, 60, dtype=torch.float64),
                     torch.tensor([-25.0], dtype=torch.float64)])
    model = Quadratic(lam)
    data = [(torch.zeros(1), torch.zeros(1))]
    eigs = samfast.hessian_eigenvalues(model, value_loss, data, k=3, max_iter=len(lam),
                                       tol=1e-12)
    torch.testing.assert_close(eigs, torch.tensor([10.0, 10.0 - 1e-4, 4.0], dtype=torch.float64),
                               rtol=1e-9, atol=0)
    # -25 has the largest magnitude but is not among the algebraically largest
    assert float(eigs.min()) > 0


def test_eigenvectors_are_eigenvectors():
    lam = torch.linspace(-1, 5, 30, dtype=torch.float64)
    model = Quadratic(lam, seed=3)
    data = [(torch.zeros(1), torch.zeros(1))]
    eigs, vecs = samfast.hessian_eigenvalues(model, value_loss, data, k=2, max_iter=30,
                                             tol=1e-12, return_eigenvectors=True)
    for value, v in zip(eigs, vecs):
        assert torch.allclose(model.a @ v, value * v, atol=1e-8)
        assert abs(float(v.norm()) - 1) < 1e-10
    _, per_param = samfast.hessian_eigenvalues(model, value_loss, data, k=1, max_iter=30,
                                               return_eigenvectors="params")
    assert per_param[0][0].shape == model.w.shape


def test_unequal_batches_weigh_by_size():
    model = mlp()
    whole = batches_for((5,), [10], seed=4)
    x, y = whole[0]
    split = [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])]
    a = samfast.hessian_eigenvalues(model, F.cross_entropy, whole, k=2, max_iter=83, tol=1e-12)
    b = samfast.hessian_eigenvalues(model, F.cross_entropy, split, k=2, max_iter=83, tol=1e-12)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_model_state_is_left_exactly_as_it_was(bn_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.0),
                          nn.Linear(6, 2)).double()
    model.train()
    model[3].eval()  # a mixed mode must survive too
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    samfast.hessian_eigenvalues(model, F.cross_entropy, [(x, y)], k=1, max_iter=10,
                                bn_mode=bn_mode)
    samfast.hessian_trace(model, F.cross_entropy, [(x, y)], n_samples=2, bn_mode=bn_mode)
    assert [m.training for m in model.modules()] == modes
    assert all("forward" not in m.__dict__ for m in model.modules())  # BN form restored
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())


def test_power_iteration_agrees_on_a_positive_spectrum_and_needs_more_products():
    lam = torch.cat([torch.tensor([6.0, 5.0], dtype=torch.float64),
                     torch.linspace(0, 4.5, 80, dtype=torch.float64)])
    model = Quadratic(lam, seed=5)
    data = [(torch.zeros(1), torch.zeros(1))]
    p_eigs, _, p_info = samfast.hessian_eigenvalues(model, value_loss, data, k=1,
                                                    method="power", max_iter=500, tol=1e-8,
                                                    return_eigenvectors=True, return_info=True)
    l_eigs, l_info = samfast.hessian_eigenvalues(model, value_loss, data, k=1, max_iter=80,
                                                 tol=1e-8, return_info=True)
    assert abs(float(p_eigs[0]) - 6.0) < 1e-5 and abs(float(l_eigs[0]) - 6.0) < 1e-8
    assert l_info.hvps * 2 <= p_info.hvps


def test_trace_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    lam = torch.linspace(-2, 3, 40, dtype=torch.float64)

    class Diagonal(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(40, dtype=torch.float64))

        def forward(self, x):
            return 0.5 * (lam * self.w * self.w).sum() + 0 * x.sum()

    data = [(torch.zeros(1), torch.zeros(1))]
    assert samfast.hessian_trace(Diagonal(), value_loss, data, n_samples=3) == \
        pytest.approx(float(lam.sum()), abs=1e-10)
    model = Quadratic(lam, seed=2)
    mean, se = samfast.hessian_trace(model, value_loss, data, n_samples=400, return_std=True)
    assert abs(mean - float(lam.sum())) < 4 * se


@pytest.mark.parametrize("kwargs, name", [(dict(k=0), "k"), (dict(method="arpack"), "method"),
                                          (dict(max_iter=0), "max_iter"), (dict(tol=0), "tol"),
                                          (dict(bn_mode="frozen"), "bn_mode")])
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        samfast.hessian_eigenvalues(mlp(), F.cross_entropy, batches_for((5,), [4]), **kwargs)


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batchnorm_in_its_affine_form_matches_the_exact_hessian(affine):
    """During the measurement an eval-mode BatchNorm runs as its affine map (cheaper double
    backward); the Hessian must be that of the model as it is, BatchNorm forward and all."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=affine), nn.Tanh(),
                          nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2, affine=affine), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if affine:
                    m.weight.normal_()
                    m.bias.normal_()
    model.eval()
    batches = batches_for((2, 6, 6), [6, 4], seed=3)
    n = sum(p.numel() for p in model.parameters())
    exact = torch.linalg.eigvalsh(exact_hessian(model, F.cross_entropy, batches)).flip(0)[:3]
    eigs = samfast.hessian_eigenvalues(model, F.cross_entropy, batches, k=3, max_iter=n,
                                       tol=1e-12)
    torch.testing.assert_close(eigs, exact, rtol=1e-6, atol=0)


def test_cached_graphs_give_the_same_products_as_rebuilt_ones(monkeypatch):
    from samfast.sharpness import _HessianOperator, _measurement_mode
    model = small_cnn()
    batches = batches_for((2, 6, 6), [7, 5, 3])
    gen = torch.Generator().manual_seed(4)
    vs = [torch.randn(sum(p.numel() for p in model.parameters()), generator=gen,
                      dtype=torch.float64) for _ in range(3)]
    with _measurement_mode(model, "eval"):
        cached = _HessianOperator(model, F.cross_entropy, batches, cache_graph=True)
        rebuilt = _HessianOperator(model, F.cross_entropy, batches, cache_graph=False)
        for v in vs:
            assert torch.equal(cached(v), rebuilt(v))
        assert len(cached.graphs) == 3 and rebuilt.graphs is None
        auto = _HessianOperator(model, F.cross_entropy, batches)  # tiny graphs: kept
        auto(vs[0])
        assert auto.graphs is not None and auto.graph_bytes > 0
        monkeypatch.setattr("samfast.sharpness._free_memory", lambda device: 0)
        auto = _HessianOperator(model, F.cross_entropy, batches)  # no room: rebuilt
        assert torch.equal(auto(vs[1]), cached(vs[1])) and auto.graphs is None
    with pytest.raises(ValueError, match="cache_graph"):
        samfast.hessian_eigenvalues(model, F.cross_entropy, batches, cache_graph="yes")


class _DiagonalOperator:
    """H = diag(d), the interface _lanczos uses: a cheap stand-in for Hessian products."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.numel, self.device, self.calls = d, len(d), d.device, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.d * v


class _Allocations(TorchDispatchMode):
    """Bytes of every tensor storage an op creates (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.nbytes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor)
                        and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_lanczos_basis_is_one_buffer_that_doubles():
    """Re-stacking the basis every iteration copies it m times (m^2 / 2 vectors) and holds
    it twice. The basis must be one buffer of 16 rows that doubles when full (16, 32, 64
    rows for 40 iterations, capped at max_iter + 1 = 41), and every other allocation at most
    one vector; a run that converges early holds only its first 16 rows."""
    from samfast.sharpness import _lanczos
    n, max_iter = 3000, 40
    d = torch.linspace(0.0, 1.0, n, dtype=torch.float64)  # dense: no early stop
    with _Allocations() as allocations:
        values, _, info = _lanczos(_DiagonalOperator(d), 2, max_iter, 1e-14, 0, None, False)
    assert info.iterations == max_iter and not info.converged
    vector = n * 8
    big = [b for b in allocations.nbytes if b > vector]
    assert big == [16 * vector, 32 * vector, 41 * vector]
    assert sum(allocations.nbytes) < (16 + 32 + 41) * vector + 12 * max_iter * vector
    assert 0.99 < float(values[0]) <= 1.0 + 1e-12  # Ritz values lie inside the spectrum
    few = torch.tensor([3.0, 2.0, 1.0] + [0.0] * (n - 3), dtype=torch.float64)
    with _Allocations() as allocations:  # an invariant subspace after 4 vectors
        _lanczos(_DiagonalOperator(few), 1, max_iter, 1e-10, 0, None, False)
    assert [b for b in allocations.nbytes if b > vector] == [16 * vector]


def test_residuals_bound_the_error_and_flag_convergence():
    """For every returned eigenvalue, the exact spectrum has a point within its residual;
    an eigenvalue flagged converged is within tol of it, and stopping early leaves the
    others flagged."""
    lam = torch.cat([torch.tensor([10.0, 9.0], dtype=torch.float64),
                     torch.linspace(-2, 8, 70, dtype=torch.float64)])
    model = Quadratic(lam, seed=7)
    data = [(torch.zeros(1), torch.zeros(1))]
    for max_iter, tol in ((3, 1e-6), (8, 1e-6), (40, 1e-6), (40, 1e-3)):
        eigs, info = samfast.hessian_eigenvalues(model, value_loss, data, k=2,
                                                 max_iter=max_iter, tol=tol, return_info=True)
        assert len(info.residuals) == len(info.eigenvalue_converged) == 2
        for value, residual, ok in zip(eigs.tolist(), info.residuals,
                                       info.eigenvalue_converged):
            error = float((lam - value).abs().min())
            assert error <= residual * (1 + 1e-9) + 1e-12
            assert ok == (residual <= tol * abs(value))
            if ok:
                assert error <= tol * abs(value)
        assert info.converged == all(info.eigenvalue_converged)
        assert info.converged == (info.iterations < max_iter)
        if max_iter == 3:
            assert not any(info.eigenvalue_converged)
        if max_iter == 40:
            assert info.converged
            torch.testing.assert_close(eigs, lam[:2], rtol=tol, atol=0)
    _, p_info = samfast.hessian_eigenvalues(model, value_loss, data, k=1, method="power",
                                            max_iter=2, tol=1e-6, return_info=True)
    assert p_info.eigenvalue_converged == [False] and not p_info.converged
