r"""Sharpness: top Hessian eigenvalues (Lanczos, power iteration) and the Hessian trace.

The loss whose Hessian is taken is the sample-weighted mean of ``loss_fn(model(x), y)`` over
all batches of ``data``:  L(w) = sum_b (n_b / N) * loss_fn(model(x_b), y_b)  (``loss_fn``
returns a batch mean; batches of unequal size weigh by their size). The parameters are those
with ``requires_grad``.

Hessian-vector products are double-backward products accumulated over the batches, in the
model's dtype:  H v = d/dw < dL/dw , v >.  Two things make them cheap (measured on the
development CPU, ResNet-20, 2 x 256 images, one product relative to one forward + backward):

* the graph of dL/dw is built once per batch and kept (``cache_graph``), so each product is
  one backward pass through it, not a forward, a backward and that pass (3.97x -> 2.84x);
  memory: the saved tensors of a forward and a backward per batch (about 370 MB per 128
  images for ResNet-20); ``"auto"`` keeps them when they fit in a quarter of the free memory;
* BatchNorm in eval mode is the per-channel affine map  x * s + (beta - mean * s),
  s = gamma / sqrt(var + eps), and is evaluated in that form during the measurement:
  PyTorch's batch-norm double backward is the general batch-statistics formula, a third of
  the product's time (2.84x -> 1.64x). Same function; results change only by rounding.

The Lanczos bookkeeping (basis, tridiagonal matrix,
Ritz values) is float64 with full reorthogonalization, so a run of m iterations returns the
extreme eigenvalues of H restricted to the m-dimensional Krylov space. Its memory is one
buffer of (max_iter + 1) x num_params float64 numbers, allocated before the first product
(``basis_device="cpu"`` keeps it off the GPU). The recurrence gives the residual of every
Ritz pair for free; an eigenvalue has converged when its residual, which bounds its error, is
within ``tol`` of it (relative), the criterion of ARPACK and SLEPc. A change per iteration
below ``tol`` (PyHessian's rule) bounds nothing: converging geometrically at rate rho, a value
is still rho / (1 - rho) times its last change away, more than that change once rho > 1/2 (a
small gap to the next eigenvalue). Eigenvalues that did not converge within ``max_iter`` are
flagged in :class:`SharpnessInfo`.

``data`` is one ``(inputs, targets)`` batch or an iterable of them (see ``_args.as_batches``).

The model is left exactly as it was: its train/eval mode (per module), its ``.grad``s (the
products use ``torch.autograd.grad``) and its BatchNorm buffers. BatchNorm runs in eval mode
by default (the running statistics define the function being measured); ``bn_mode="train"``
uses batch statistics as the paper's released code does, and restores the buffers it moves.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ._args import SEED_MAX, as_batches, float_arg, int_arg

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SharpnessInfo:
    """How a run went: Hessian-vector products used, the top Ritz values per iteration, and
    for each returned eigenvalue (largest first) how far it can be trusted.

    ``residuals[i]`` is ||H y - theta y|| for the returned pair (theta, y), ||y|| = 1: H has
    an eigenvalue within that distance of theta (a bound, for any symmetric H; the error is
    usually far smaller, about residual^2 / the gap to the next eigenvalue).
    ``eigenvalue_converged[i]`` is ``residuals[i] <= tol * |theta|``, and ``converged`` is
    True when all of them are.
    """

    method: str
    hvps: int = 0
    iterations: int = 0
    converged: bool = False
    history: list = field(default_factory=list)
    residuals: list = field(default_factory=list)
    eigenvalue_converged: list = field(default_factory=list)


@contextlib.contextmanager
def _measurement_mode(model: nn.Module, bn_mode: str):
    """Eval (or train) mode inside; every module's mode and every buffer restored after."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"Invalid bn_mode: {bn_mode!r} (choose 'eval' or 'train')")
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.train(bn_mode == "train")
    patched = []
    if bn_mode == "eval":
        for m in model.modules():
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                    and m.running_var is not None and "forward" not in m.__dict__):
                m.forward = _affine_batch_norm(m)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.__dict__["forward"]
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for m, training in modes.items():
            m.training = training


def _affine_batch_norm(bn: nn.modules.batchnorm._BatchNorm):
    """An eval-mode BatchNorm layer as the affine map it is (see the module docstring)."""
    def forward(x: Tensor) -> Tensor:
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)
    return forward


class _HessianOperator:
    """v -> H v over all of ``data`` for the trainable params of ``model``, flat float64."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data, device=None,
                 cache_graph: bool | str = "auto") -> None:
        if cache_graph not in (True, False, "auto"):
            raise ValueError(f"Invalid cache_graph: {cache_graph!r} (True, False or 'auto')")
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("Invalid model: it has no parameter with requires_grad")
        self.batches = as_batches(data)
        self.total = sum(len(y) for _, y in self.batches)
        if self.total == 0:
            raise ValueError("Invalid data: the batches hold no samples")
        self.numel = sum(p.numel() for p in self.params)
        self.device = device or self.params[0].device
        self.calls = 0
        self.cache_graph = cache_graph
        self.graphs: list | None = None   # per batch: dL_b/dw with its graph, when cached
        self.graph_bytes: int | None = None  # saved-tensor bytes of one batch's graph

    def _split(self, flat: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype))
            offset += p.numel()
        return out

    def _grads(self, x, y) -> tuple[Tensor, ...]:
        """dL_b/dw of one batch's share of the loss, with the graph for a second backward."""
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y) * (len(y) / self.total)
            return torch.autograd.grad(loss, self.params, create_graph=True)

    def _first_grads(self, x, y) -> tuple[Tensor, ...]:
        """Like _grads, and decides whether to keep the graphs: it counts the bytes the
        graph holds (tensors saved for backward, not the parameters) and projects them over
        all batches."""
        seen = {p.untyped_storage().data_ptr() for p in self.params}
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grads = self._grads(x, y)
        self.graph_bytes = total
        keep = self.cache_graph
        if keep == "auto":
            keep = total * self.total / max(len(y), 1) <= 0.25 * _free_memory(self.device)
        self.graphs = [] if keep else None
        return grads

    def _graph(self, b: int, x, y) -> tuple[Tensor, ...]:
        if self.graphs is not None and b < len(self.graphs):
            return self.graphs[b]
        grads = self._grads(x, y) if self.graph_bytes is not None else self._first_grads(x, y)
        if self.graphs is not None:
            self.graphs.append(grads)
        return grads

    def __call__(self, flat_v: Tensor) -> Tensor:
        self.calls += 1
        v = self._split(flat_v)
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        for b, (x, y) in enumerate(self.batches):
            grads = self._graph(b, x, y)
            # H_b v = d/dw <dL_b/dw, v>: a backward through the gradient's graph from v.
            hv = torch.autograd.grad(grads, self.params, grad_outputs=v,
                                     retain_graph=self.graphs is not None, allow_unused=True,
                                     materialize_grads=True)
            for a, h in zip(acc, hv):
                a += h.double()
        return torch.cat([a.reshape(-1) for a in acc]).to(flat_v.device)

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        return [t.detach().clone() for t in self._split(flat)]


def _free_memory(device) -> int:
    """Bytes free for the cached graphs: the GPU's free memory, or MemAvailable on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: do not cache


def _start_vector(n: int, seed: int, device) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    return v / v.norm()


_BASIS_ROWS = 16  # initial capacity of the Lanczos basis, in vectors


def _lanczos(op: _HessianOperator, k: int, max_iter: int, tol: float, seed: int, basis_device,
             want_vectors: bool):
    n = op.numel
    max_iter = min(max_iter, n)
    info = SharpnessInfo("lanczos")
    dev = torch.device(basis_device) if basis_device is not None else op.device
    # The basis is one buffer: row j is the j-th Lanczos vector and row j + 1 is where the
    # next one is built, so an iteration copies nothing. Its capacity doubles when full
    # (amortized one copy per row) rather than reserving max_iter + 1 rows up front, which
    # for a 36M-param model at max_iter 100 would be 29 GiB whether or not Lanczos converged
    # in 10 iterations: at most 2 x (iterations run + 1) rows are ever held.
    basis = torch.empty(min(max_iter + 1, _BASIS_ROWS), n, dtype=torch.float64, device=dev)
    basis[0] = _start_vector(n, seed, dev)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max_iter):
        if j + 1 == len(basis):
            grown = torch.empty(min(max_iter + 1, 2 * len(basis)), n, dtype=torch.float64,
                                device=dev)
            grown[:len(basis)] = basis
            basis = grown
        q, w = basis[j], basis[j + 1]
        w.copy_(op(q.to(op.device)))
        alpha = float(w @ q)
        alphas.append(alpha)
        w.add_(q, alpha=-alpha)
        if j > 0:
            w.add_(basis[j - 1], alpha=-betas[-1])
        V = basis[:j + 1]
        for _ in range(2):  # full reorthogonalization, twice is enough ("twice is enough")
            w.addmv_(V.T, V @ w, alpha=-1)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, evecs = torch.linalg.eigh(t)
        # H y - theta y = beta * s_last * q_next for the Ritz pair (theta, y = V s)
        residuals = beta * evecs[-1].abs()
        top = ritz.flip(0)[:k]
        info.history.append(top.tolist())
        info.iterations = j + 1
        order = torch.argsort(ritz, descending=True)[:k]
        converged = residuals[order] <= tol * ritz[order].abs()
        scale = max(abs(a) for a in alphas) or 1.0
        if beta <= 1e-12 * scale * math.sqrt(n):  # invariant subspace: T is exact
            converged[:] = True
            break
        if len(order) == k and bool(converged.all()):
            break
        betas.append(beta)
        w /= beta
    info.hvps = op.calls
    info.residuals = residuals[order].tolist()
    info.eigenvalue_converged = converged.tolist()
    info.converged = bool(converged.all())
    values = ritz[order].cpu()
    vectors = None
    if want_vectors:
        V = basis[:len(alphas)]
        vectors = [(V.T @ evecs[:, i].to(V.device)) for i in order]
    return values, vectors, info


def _power(op: _HessianOperator, k: int, max_iter: int, tol: float, seed: int):
    """PyHessian's method: power iteration per eigenvalue, deflated by Gram-Schmidt against
    the eigenvectors already found. Converges to the eigenvalues of largest *magnitude*.
    Each eigenvalue stops at a relative change below ``tol`` (PyHessian's rule), which is
    often before its residual is within ``tol`` of it, so it may be flagged unconverged."""
    info = SharpnessInfo("power")
    found: list[Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    converged: list[bool] = []
    for i in range(k):
        v = _start_vector(op.numel, seed + i, op.device)
        eig = residual = None
        for _ in range(max_iter):
            for u in found:
                v = v - (v @ u) * u
            v = v / v.norm()
            hv = op(v)
            new = float(hv @ v)
            info.history.append(new)
            residual = float((hv - new * v).norm())
            stop = eig is not None and abs(new - eig) / max(abs(new), 1e-30) < tol
            eig = new
            if stop:
                break
            v = hv
        for u in found:
            v = v - (v @ u) * u
        found.append(v / v.norm())
        values.append(eig)
        residuals.append(residual)
        converged.append(residual <= tol * abs(eig))
        info.iterations += 1
    info.hvps = op.calls
    order = sorted(range(k), key=lambda i: -values[i])
    info.residuals = [residuals[i] for i in order]
    info.eigenvalue_converged = [converged[i] for i in order]
    info.converged = all(converged)
    return (torch.tensor([values[i] for i in order], dtype=torch.float64),
            [found[i] for i in order], info)


def hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Iterable, k: int = 1,
                        method: str = "lanczos", max_iter: int = 100, tol: float = 1e-4,
                        seed: int = 0, return_eigenvectors: bool | str = False,
                        bn_mode: str = "eval", basis_device=None, return_info: bool = False,
                        cache_graph: bool | str = "auto"):
    """The ``k`` algebraically largest eigenvalues of the Hessian of the loss over ``data``,
    largest first, as a float64 CPU tensor.

    Args:
        data: one batch ``(inputs, targets)`` (a tuple or list of exactly two tensors with
            the same first dimension, as PyHessian takes it) or an iterable of such batches.
        method: "lanczos" (default) or "power" (power iteration with deflation, as PyHessian;
            it finds the largest-magnitude eigenvalues, which differ when H has large negative
            ones).
        max_iter: Lanczos iterations (each one Hessian-vector product), or power iterations
            per eigenvalue. Lanczos keeps its basis in one buffer of float64 rows on
            ``basis_device`` that doubles when full: at most ``2 x (iterations + 1) x
            num_params`` numbers, 16 rows at first.
        tol: relative accuracy: an eigenvalue theta has converged when the residual of its
            eigenpair is at most ``tol * |theta|`` (so its error is too); Lanczos stops when
            all ``k`` have. Power iteration stops each eigenvalue by PyHessian's rule (a
            relative change below ``tol`` in one iteration), and flags it by the residual.
        seed: the start vector's (an int in [0, 2**63)).
        return_eigenvectors: False, True / "flat" (flat float64 vectors), or "params"
            (per-parameter tensors in the params' dtype).
        bn_mode: "eval" (default) or "train" (batch statistics; buffers are restored).
        basis_device: where the Lanczos basis lives (e.g. "cpu" for big models on a GPU).
        return_info: also return a :class:`SharpnessInfo`: iterations, products used, and per
            eigenvalue its residual and whether it converged. Without it, an eigenvalue that
            did not converge within ``max_iter`` is returned all the same.
        cache_graph: keep each batch's gradient graph between products (True), rebuild it
            for every product (False: memory of one batch only), or decide from its size
            ("auto", the default: keep when all batches' graphs fit in a quarter of the free
            memory of the device).

    Integer arguments take any integer type (``np.int64``), ``tol`` any real number; a bad
    argument raises ValueError naming it, bad ``data`` TypeError or ValueError.
    """
    k = int_arg("k", k, 1)
    if method not in ("lanczos", "power"):
        raise ValueError(f"Invalid method: {method!r} (choose 'lanczos' or 'power')")
    max_iter = int_arg("max_iter", max_iter, 1)
    tol = float_arg("tol", tol, strict=True)
    seed = int_arg("seed", seed, 0, SEED_MAX)
    if return_eigenvectors not in (False, True, "flat", "params"):
        raise ValueError(f"Invalid return_eigenvectors: {return_eigenvectors!r}")
    with _measurement_mode(model, bn_mode):
        op = _HessianOperator(model, loss_fn, data, cache_graph=cache_graph)
        if k > op.numel:
            raise ValueError(f"Invalid k: {k} > {op.numel} parameters")
        if method == "lanczos":
            values, vectors, info = _lanczos(op, k, max(max_iter, k), tol, seed, basis_device,
                                             bool(return_eigenvectors))
        else:
            values, vectors, info = _power(op, k, max_iter, tol, seed)
        op.graphs = None  # free the cached graphs now
    result = [values]
    if return_eigenvectors:
        if return_eigenvectors == "params":
            vectors = [op.unflatten(v) for v in vectors]
        else:
            vectors = [v.cpu() for v in vectors]
        result.append(vectors)
    if return_info:
        result.append(info)
    return result[0] if len(result) == 1 else tuple(result)


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Iterable, n_samples: int = 64,
                  seed: int = 0, bn_mode: str = "eval", return_std: bool = False,
                  cache_graph: bool | str = "auto"):
    """Hutchinson's estimate of tr(H): the mean of v^T H v over ``n_samples`` Rademacher
    vectors v (unbiased; with ``return_std`` also the standard error of the mean).
    ``data``, ``cache_graph`` and the argument checks as in :func:`hessian_eigenvalues`."""
    n_samples = int_arg("n_samples", n_samples, 1)
    seed = int_arg("seed", seed, 0, SEED_MAX)
    gen = torch.Generator().manual_seed(seed)
    with _measurement_mode(model, bn_mode):
        op = _HessianOperator(model, loss_fn, data, cache_graph=cache_graph)
        samples = []
        for _ in range(n_samples):
            v = (torch.randint(0, 2, (op.numel,), generator=gen, dtype=torch.float64) * 2 - 1)
            v = v.to(op.device)
            samples.append(float(op(v) @ v))
        op.graphs = None
    mean = sum(samples) / n_samples
    if not return_std:
        return mean
    var = sum((s - mean) ** 2 for s in samples) / max(n_samples - 1, 1)
    return mean, math.sqrt(var / n_samples)
