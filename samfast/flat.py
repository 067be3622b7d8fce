"""Flat parameter buffers: the memory layout the fused backends work on.

A :class:`FlatBucket` owns, for the params of one (param group, device, dtype):

* ``param`` — one contiguous buffer; every ``p.data`` becomes a view into it,
* ``grad`` — one contiguous buffer holding the gradients the step reads,
* ``backup`` — the pre-ascent weights (SAM's one extra parameter-sized buffer),
* ``momentum`` — SGD's momentum, whose per-param views are what ``optimizer.state`` holds,
* ``gv`` — LookSAM's g_v (samfast/policies.py), allocated only when a LookSAM policy steps:
  one more parameter-sized buffer,

so a SAM step is a handful of kernels over a few long buffers instead of several kernels per
tensor. Each view keeps the strides of the param it replaces (channels_last stays
channels_last); elementwise kernels only need param and grad views to share strides.

Layout: every param's slice starts at a multiple of :data:`ALIGN` elements and is followed by
zeros up to the next such multiple, so every run of params a kernel sees starts 16-byte aligned
and has a length divisible by 16 — what the vectorized (128-bit) specializations of the GPU
kernels need (Triton specializes pointers aligned to 16 bytes and sizes divisible by 16). The
padding stays zero in every buffer: no op moves a zero weight with a zero gradient (ascent:
0 + scale * T^2 * 0; SGD: d = 0 + wd * 0, buf = m * 0 + 0, w = 0 - lr * 0), and zeros add
nothing to a sum of squares. It costs at most 15 elements per param.

Gradients follow torch's contract exactly. ``p.grad`` is None until a backward reaches p (or
the user assigns it); the post-accumulate-grad hook the optimizer registers (see
``samfast.sam``) then copies the fresh gradient, which autograd allocated as it would for any
optimizer, into the flat buffer while it is hot in cache, and points ``p.grad`` at its view;
further backward passes (micro-batch accumulation) add into that view in place. A gradient the
user assigned or wrote after the last backward is copied in at the step (one warning: the copy
path is slower). ``zero_grad()`` sets every grad to None (no fill at all);
``zero_grad(set_to_none=False)`` zeroes them, and such params are stepped with zero gradients,
as torch.optim does. A param is stepped exactly when ``p.grad is not None``.

SGD momentum: torch starts a param's buffer as a copy of its first update, on its first step
that is not skipped. Whether that step was skipped is a device flag (no host sync), so whether
each buffer has started is kept on the device too (``started``, one bool per param) and the
kernel reads it. Params whose step histories are identical share one ``started`` value; they
form a *cohort* (host-side bookkeeping), and a kernel launch covers consecutive params of one
cohort. Usually every param is stepped every time: one cohort, one launch per bucket.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .fsdp import local

# Elements: 16 x 2 bytes (fp16/bf16) = 32 bytes, fp32 64 bytes (a CPU cache line), fp64 128.
ALIGN = 16


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _view_like(buf: Tensor, offset: int, p: Tensor) -> Tensor:
    """A view of ``buf[offset : offset + p.numel()]`` with p's shape and strides."""
    if p.is_contiguous() or p.dim() == 0:
        return buf[offset:offset + p.numel()].view(p.shape)
    if not _is_dense(p):
        raise ValueError("Invalid params: the fused backends need dense (non-overlapping, "
                         "gap-free) parameter tensors; use backend='reference'")
    return buf.as_strided(p.shape, p.stride(), offset)


def _zero_grad_(g: Tensor) -> None:
    """Zero a gradient in place, as ``torch.optim.Optimizer.zero_grad(set_to_none=False)``."""
    if g.grad_fn is not None:
        g.detach_()
    else:
        g.requires_grad_(False)
    g.zero_()


def _is_dense(p: Tensor) -> bool:
    dims = sorted((s, n) for s, n in zip(p.stride(), p.shape) if n > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


class FlatBucket:
    """Contiguous param/grad/backup/momentum buffers for one (group, device, dtype)."""

    def __init__(self, params: list[Tensor], group_index: int,
                 layout: list[Tensor] | None = None) -> None:
        self.params = params
        self.group_index = group_index
        # The tensors whose sizes and strides the views take: the params themselves, or
        # (ShardedFlatBucket) this rank's local shards of them.
        layout = params if layout is None else layout
        self.device, self.dtype = layout[0].device, layout[0].dtype
        self.offsets, offset = [], 0
        for p in layout:
            self.offsets.append(offset)
            offset += _padded(p.numel())
        # A param's slice runs to the next param's offset: a run includes its zero padding.
        self.ends = self.offsets[1:] + [offset]
        self.numel = offset
        kw = dict(dtype=self.dtype, device=self.device)
        self.param = torch.zeros(self.numel, **kw)
        self.grad = torch.zeros(self.numel, **kw)
        self.backup = torch.zeros(self.numel, **kw)
        self.layout = layout
        self.param_views = [_view_like(self.param, o, p) for o, p in zip(self.offsets, layout)]
        self.param_ptrs = [v.data_ptr() for v in self.param_views]
        self.grad_views = [_view_like(self.grad, o, p) for o, p in zip(self.offsets, layout)]
        self._warned_copy = False
        # SGD momentum (allocated on the first SGD step)
        self.momentum: Tensor | None = None
        self.momentum_views: list[Tensor] = []
        self.started: Tensor | None = None       # device: has param i's buffer started?
        self.started_views: list[Tensor] = []
        self.started_host: list[bool] | None = [False] * len(params)  # None: device-only
        self.cohort = [0] * len(params)
        self._next_cohort = 1
        self.published = [False] * len(params)   # state[p] holds its momentum view
        # LookSAM's g_v (allocated on its first full step)
        self.gv: Tensor | None = None
        self.gv_views: list[Tensor] = []
        self._mask_tensors: dict[tuple, Tensor] = {}
        self._adopt_params()

    @torch.no_grad()
    def _adopt_params(self) -> None:
        for i, p in enumerate(self.params):
            self._adopt_param(i)
            if p.grad is not None:
                self.grad_views[i].copy_(p.grad)
                p.grad = self.grad_views[i]

    def _check_placement(self, t: Tensor) -> None:
        """``t`` (a param, or under FSDP2 its local shard) is where the buffers are."""
        if t.device != self.device or t.dtype != self.dtype:
            raise RuntimeError(
                f"a parameter moved to {t.device}/{t.dtype} after the optimizer was built on "
                f"{self.device}/{self.dtype}; build the optimizer after model.to(...)")

    def _adopt_param(self, i: int) -> None:
        p = self.params[i]
        self._check_placement(p)
        view = self.param_views[i]
        if p.data_ptr() != view.data_ptr():
            view.copy_(p.detach())
            p.data = view

    # -- gradients ------------------------------------------------------------------------------

    @torch.no_grad()
    def adopt_grad(self, i: int) -> None:
        """After a backward reached param i (its post-accumulate-grad hook): move a freshly
        allocated gradient into the flat buffer and point ``p.grad`` at its view. A gradient
        that is part of a graph (``create_graph=True``) stays where it is (copied at the step)."""
        p = self.params[i]
        g, view = p.grad, self.grad_views[i]
        if (g is None or g is view or g.is_sparse or g.requires_grad
                or p.dtype != self.dtype or p.device != self.device):  # the step will say why
            return
        view.copy_(g)
        p.grad = view

    @torch.no_grad()
    def active_mask(self) -> list[bool]:
        """Which params have a gradient now (``p.grad is not None``, as torch.optim), with
        every gradient in the flat buffer: one the user assigned or rewrote is copied in."""
        mask = []
        views, ptrs = self.grad_views, self.param_ptrs
        for i, p in enumerate(self.params):
            if p.data_ptr() != ptrs[i]:
                self._adopt_param(i)
            g = p.grad
            if g is None:
                mask.append(False)
                continue
            if g is not views[i]:
                if g.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                if not self._warned_copy:
                    warnings.warn("samfast: a .grad that is not the flat buffer's view was "
                                  "copied into it (gradients assigned by hand, written after "
                                  "the backward, or DDP(gradient_as_bucket_view=True)); this "
                                  "costs one copy per step. Gradients from backward() need no "
                                  "copy.", stacklevel=4)
                    self._warned_copy = True
                views[i].copy_(g)
            mask.append(True)
        return mask

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; grads that are views are zeroed by one fill
        of the buffer (padding included, which stays zero)."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        any_view = False
        for p, view in zip(self.params, self.grad_views):
            g = p.grad
            if g is None:
                continue
            if g is view:
                any_view = True
                continue
            _zero_grad_(g)
        if any_view:
            self.grad.zero_()

    def _ranges(self, keys: list) -> list[tuple[int, int, object]]:
        """Maximal runs of consecutive params with the same key (None = skip)."""
        if keys.count(keys[0]) == len(keys):  # the common case: one run or none
            return [] if keys[0] is None else [(0, self.numel, keys[0])]
        runs: list[tuple[int, int, object]] = []
        for i, key in enumerate(keys):
            if key is None:
                continue
            start, end = self.offsets[i], self.ends[i]
            if runs and runs[-1][2] == key and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end, key)
            else:
                runs.append((start, end, key))
        return runs

    def runs(self, mask: list[bool]) -> list[tuple[int, int]]:
        return [(s, e) for s, e, _ in self._ranges([True if m else None for m in mask])]

    def inactive_runs(self, mask: list[bool]) -> list[tuple[int, int]]:
        return [(s, e) for s, e, _ in self._ranges([None if m else True for m in mask])]

    def mask_tensor(self, mask: list[bool]) -> Tensor:
        """``mask`` as a bool tensor on the device (cached: masks rarely change). Made by fills
        rather than a copy from the host, which a CUDA graph capture would not allow."""
        key = tuple(mask)
        t = self._mask_tensors.get(key)
        if t is None:
            if len(self._mask_tensors) > 8:
                self._mask_tensors.clear()
            t = torch.zeros(len(mask), dtype=torch.bool, device=self.device)
            start = None
            for i, m in enumerate(mask + [False]):
                if m and start is None:
                    start = i
                elif not m and start is not None:
                    t[start:i].fill_(True)
                    start = None
            self._mask_tensors[key] = t
        return t

    # -- LookSAM's g_v --------------------------------------------------------------------------

    def ensure_gv(self) -> None:
        if self.gv is None:
            self.gv = torch.zeros_like(self.param)
            self.gv_views = [_view_like(self.gv, o, p) for o, p in zip(self.offsets, self.layout)]

    def release_gv(self) -> None:
        self.gv, self.gv_views = None, []

    # -- SGD momentum ---------------------------------------------------------------------------

    def _ensure_momentum(self) -> None:
        if self.momentum is None:
            self.momentum = torch.zeros_like(self.param)
            self.momentum_views = [_view_like(self.momentum, o, p)
                                   for o, p in zip(self.offsets, self.layout)]
            self.started = torch.zeros(len(self.params), dtype=torch.bool, device=self.device)
            self.started_views = list(self.started.unbind())

    def momentum_runs(self, mask: list[bool]) -> list[tuple[int, int, Tensor]]:
        """Active runs, each within one cohort, with the device flag saying whether the run's
        buffers have started."""
        self._ensure_momentum()
        first_of: dict[int, int] = {}
        for i, c in enumerate(self.cohort):
            first_of.setdefault(c, i)
        keys = [self.cohort[i] if m else None for i, m in enumerate(mask)]
        return [(s, e, self.started_views[first_of[c]]) for s, e, c in self._ranges(keys)]

    def momentum_stepped(self, mask: list[bool], skip: Tensor | bool, state: dict) -> None:
        """After an SGD step over ``mask`` (skipped if ``skip``): the stepped params' buffers
        have started unless the step was skipped; their state holds their momentum views."""
        every = all(mask)
        if isinstance(skip, Tensor):  # device flag (CUDA): no host sync
            self.started.logical_or_(~skip if every else self.mask_tensor(mask) & ~skip)
            self.started_host = None
        elif not skip:
            if every:
                self.started.fill_(True)
            else:
                self.started.logical_or_(self.mask_tensor(mask))
            if self.started_host is not None:
                self.started_host = [s or m for s, m in zip(self.started_host, mask)]
        if not every:
            self._split_cohorts(mask)
        if not all(self.published):
            for i, p in enumerate(self.params):
                if mask[i] and not self.published[i]:
                    state[p]["momentum_buffer"] = self._published_momentum(i)
                    self.published[i] = True

    def _published_momentum(self, i: int) -> Tensor:
        """What ``optimizer.state[p]["momentum_buffer"]`` holds for param i: its view."""
        return self.momentum_views[i]

    def _holds(self, buf: Tensor, i: int) -> bool:
        """Whether the state's ``buf`` already is param i's momentum view."""
        return buf is self.momentum_views[i]

    def _split_cohorts(self, mask: list[bool]) -> None:
        """A cohort whose params were partly stepped splits: the stepped ones' flags changed."""
        members: dict[int, list[int]] = {}
        for i, c in enumerate(self.cohort):
            members.setdefault(c, []).append(i)
        for idx in members.values():
            stepped = [mask[i] for i in idx]
            if any(stepped) and not all(stepped):
                for i in idx:
                    if not mask[i]:
                        self.cohort[i] = self._next_cohort
                self._next_cohort += 1

    def unstarted(self) -> list[bool]:
        """Per param: True when its momentum buffer has not started (reads the device flags
        once after steps whose skip decision stayed on the device)."""
        if self.started is None:
            return [True] * len(self.params)
        if self.started_host is None:
            self.started_host = self.started.tolist()
        return [not s for s in self.started_host]

    @torch.no_grad()
    def adopt_state(self, state: dict) -> None:
        """The optimizer's state was replaced (load_state_dict, reset): copy loaded momentum
        buffers into the flat buffer, point the state at the views, and set the flags."""
        has = []
        for p in self.params:
            entry = state.get(p) if p in state else None
            has.append(entry is not None and entry.get("momentum_buffer") is not None)
        if not any(has) and self.momentum is None:
            return
        self._ensure_momentum()
        for i, p in enumerate(self.params):
            if has[i]:
                buf = state[p]["momentum_buffer"]
                if not self._holds(buf, i):
                    self.momentum_views[i].copy_(local(buf))
                    state[p]["momentum_buffer"] = self._published_momentum(i)
        self.published = list(has)
        self.started_host = list(has)
        self.started.copy_(torch.tensor(has, dtype=torch.bool))
        self.cohort = [1 if h else 0 for h in has]
        self._next_cohort = 2


class ShardedFlatBucket(FlatBucket):
    """FSDP2 (params that are sharded DTensors, see samfast/fsdp.py): the flat buffers of this
    rank's local shards.

    FSDP2 keeps each param's shard in its own padded allocation and all-gathers from it, so
    the shards cannot become views of a buffer samfast owns (that would take FSDP2's private
    ``FSDPParam._sharded_param_data``). The ``param`` buffer is therefore a mirror: the step
    copies the shards in before it reads the weights (:meth:`gather`, one
    ``torch._foreach_copy_``) and back out after every write (:meth:`scatter`: after the
    ascent, so that the second forward all-gathers w + e, and after the update), and the
    reduce-scattered gradients are copied in from ``p.grad``'s local shard. Against the
    unsharded fused step that is three more copies of the shard (one read and one write of
    P / world each) and the mirror (one more P / world of memory); the ops themselves are the
    same few launches over one buffer. The shards stay the truth between steps: a weight
    written outside the optimizer (a model ``load_state_dict``, EMA) is gathered at the next
    step. Momentum lives in the flat buffer; ``optimizer.state`` holds DTensors sharded like
    the params whose local tensors are its views (``torch.distributed.checkpoint`` and
    ``samfast.fsdp.full_optimizer_state`` see exactly what torch's SGD would keep).
    """

    def __init__(self, params: list[Tensor], group_index: int) -> None:
        super().__init__(params, group_index, layout=[local(p.detach()) for p in params])

    @torch.no_grad()
    def _adopt_params(self) -> None:
        pass  # FSDP2 owns the shards' storage: see the class docstring

    def _shards(self) -> list[Tensor]:
        # fetched each time: FSDP2 may replace a param's local tensor (reset_sharded_param)
        shards = [local(p.detach()) for p in self.params]
        for shard in shards:
            self._check_placement(shard)
        return shards

    @torch.no_grad()
    def gather(self) -> None:
        """The weights of the local shards into the ``param`` buffer."""
        torch._foreach_copy_(self.param_views, self._shards())

    @torch.no_grad()
    def scatter(self) -> None:
        """The ``param`` buffer back into the local shards (which the next forward gathers)."""
        torch._foreach_copy_(self._shards(), self.param_views)

    def adopt_grad(self, i: int) -> None:
        pass  # FSDP2 assigns its reduce-scattered gradient; active_mask copies it in

    @torch.no_grad()
    def active_mask(self) -> list[bool]:
        mask = [p.grad is not None for p in self.params]
        pairs = [(view, local(p.grad)) for view, p, m in zip(self.grad_views, self.params, mask)
                 if m]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
        return mask

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                _zero_grad_(p.grad)

    def _published_momentum(self, i: int) -> Tensor:
        from torch.distributed.tensor import DTensor

        p = self.params[i]
        return DTensor.from_local(self.momentum_views[i], p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())

    def _holds(self, buf: Tensor, i: int) -> bool:
        view, mine = self.momentum_views[i], local(buf)
        return mine is view or (mine.numel() > 0 and mine.data_ptr() == view.data_ptr())
