"""Flat parameter buffers: the memory layout the fused backends work on.

A :class:`FlatBucket` owns, for the params of one (param group, device, dtype):

* ``param`` — one contiguous buffer; every ``p.data`` becomes a view into it,
* ``grad`` — one contiguous buffer; every ``p.grad`` is a view into it (autograd accumulates
  into an existing ``.grad`` in place, so backward writes straight into the buffer),
* ``backup`` — the pre-ascent weights (SAM's one extra parameter-sized buffer),
* ``momentum`` — SGD's momentum, whose per-param views are what ``optimizer.state`` holds.

so a SAM step is a handful of kernels over a few long buffers instead of several kernels per
tensor. Each view keeps the strides of the param it replaces (channels_last stays
channels_last); elementwise kernels only need param and grad views to share strides.

torch semantics survive: :meth:`active_mask` reports a param as having no gradient when its
grad is None, or when no backward reached it since :meth:`zero_grad` (tracked with
post-accumulate-grad hooks). Code that replaces ``p.grad`` (``model.zero_grad()`` sets it to
None, after which autograd allocates a fresh tensor) is detected: the gradient is copied into
the buffer and the view put back — correct, but one extra copy per step. Params moved or
re-created behind the optimizer's back (``load_state_dict(assign=True)``, ``p.data = ...``)
are adopted again the same way; a param that changed device or dtype raises.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor


def _view_like(buf: Tensor, offset: int, p: Tensor) -> Tensor:
    """A view of ``buf[offset : offset + p.numel()]`` with p's shape and strides."""
    if p.is_contiguous() or p.dim() == 0:
        return buf[offset:offset + p.numel()].view(p.shape)
    if not _is_dense(p):
        raise ValueError("Invalid params: the fused backends need dense (non-overlapping, "
                         "gap-free) parameter tensors; use backend='reference'")
    return buf.as_strided(p.shape, p.stride(), offset)


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

    def __init__(self, params: list[Tensor], group_index: int) -> None:
        self.params = params
        self.group_index = group_index
        self.device, self.dtype = params[0].device, params[0].dtype
        self.offsets, self.ends, offset = [], [], 0
        for p in params:
            self.offsets.append(offset)
            offset += p.numel()
            self.ends.append(offset)
        self.numel = offset
        kw = dict(dtype=self.dtype, device=self.device)
        self.param = torch.empty(self.numel, **kw)
        self.grad = torch.zeros(self.numel, **kw)
        self.backup = torch.empty(self.numel, **kw)
        self.momentum: Tensor | None = None
        self.param_views = [_view_like(self.param, o, p) for o, p in zip(self.offsets, params)]
        self.param_ptrs = [v.data_ptr() for v in self.param_views]
        self.grad_views = [_view_like(self.grad, o, p) for o, p in zip(self.offsets, params)]
        self.momentum_views: list[Tensor] = []
        # True once every stepped param's state holds its momentum view; cleared when the
        # optimizer's state is replaced (load_state_dict), so the per-step check is skipped.
        self.momentum_adopted = False
        self.received = [False] * len(params)
        # Frozen params cannot take a hook: their grad stays a plain attribute (None) until
        # they are unfrozen and receive one, which the copy path then adopts and hooks.
        self.hooked = [False] * len(params)
        self._warned_copy = False
        with torch.no_grad():
            for i, p in enumerate(params):
                self._adopt_param(i)
                if p.grad is not None:
                    self.grad_views[i].copy_(p.grad)
                    self.received[i] = True
                self._hook(i)
                if self.hooked[i]:
                    p.grad = self.grad_views[i]

    def _hook(self, i: int) -> None:
        p = self.params[i]
        if self.hooked[i] or not p.requires_grad:
            return

        def mark_received(_: Tensor) -> None:
            self.received[i] = True
        p.register_post_accumulate_grad_hook(mark_received)
        self.hooked[i] = True

    def _adopt_param(self, i: int) -> None:
        p = self.params[i]
        if p.device != self.device or p.dtype != self.dtype:
            raise RuntimeError(
                f"a parameter moved to {p.device}/{p.dtype} after the optimizer was built on "
                f"{self.device}/{self.dtype}; build the optimizer after model.to(...)")
        view = self.param_views[i]
        if p.data_ptr() != view.data_ptr():
            view.copy_(p.detach())
            p.data = view

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

    @torch.no_grad()
    def active_mask(self) -> list[bool]:
        """Which params have a gradient now (torch semantics), after putting the views back."""
        mask = []
        views, ptrs, received = self.grad_views, self.param_ptrs, self.received
        for i, p in enumerate(self.params):
            if p.data_ptr() != ptrs[i]:
                self._adopt_param(i)
            g = p.grad
            if g is views[i]:
                mask.append(received[i])
            elif g is None:
                mask.append(False)
            else:
                if not self._warned_copy:
                    warnings.warn("samfast: a .grad was replaced (model.zero_grad() sets it to "
                                  "None; DDP(gradient_as_bucket_view=True) points it into DDP's "
                                  "buckets): copying gradients into the flat buffer, which is "
                                  "slower. Use opt.zero_grad() and DDP's default to keep the "
                                  "fast path.", stacklevel=4)
                    self._warned_copy = True
                if g.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                self.grad_views[i].copy_(g)
                self._hook(i)
                if self.hooked[i]:
                    p.grad = self.grad_views[i]
                    self.received[i] = True
                mask.append(True)
        return mask

    @contextlib.contextmanager
    def inactive_grads_hidden(self, mask: list[bool]):
        """Inside: params without a gradient this step have ``grad = None``, so a base
        optimizer's own step skips them as torch.optim does; the views come back after."""
        hidden = [i for i, active in enumerate(mask) if not active and self.params[i].grad is not None]
        for i in hidden:
            self.params[i].grad = None
        try:
            yield
        finally:
            for i in hidden:
                self.params[i].grad = self.grad_views[i]

    def runs(self, mask: list[bool]) -> list[tuple[int, int]]:
        return [(s, e) for s, e, _ in self._ranges([True if m else None for m in mask])]

    def inactive_runs(self, mask: list[bool]) -> list[tuple[int, int]]:
        return [(s, e) for s, e, _ in self._ranges([None if m else True for m in mask])]

    # -- SGD momentum ---------------------------------------------------------------------------

    @torch.no_grad()
    def momentum_runs(self, mask: list[bool], state: dict) -> list[tuple[int, int, bool]]:
        """Active runs split by whether the momentum buffer exists yet (``first`` = it does
        not: torch.optim.SGD then starts it as a copy of the update). Buffers found in
        ``state`` that are not views into the flat buffer (a loaded checkpoint) are adopted."""
        if self.momentum is None:
            self.momentum = torch.zeros_like(self.param)
            self.momentum_views = [_view_like(self.momentum, o, p)
                                   for o, p in zip(self.offsets, self.params)]
        if self.momentum_adopted:
            return [(s, e, False) for s, e in self.runs(mask)]
        keys = []
        for i, p in enumerate(self.params):
            if not mask[i]:
                keys.append(None)
                continue
            buf = state.get(p, {}).get("momentum_buffer") if p in state else None
            if buf is None:
                keys.append(True)
                continue
            if buf is not self.momentum_views[i]:
                self.momentum_views[i].copy_(buf)
                state[p]["momentum_buffer"] = self.momentum_views[i]
            keys.append(False)
        return list(self._ranges(keys))

    def publish_momentum(self, mask: list[bool], state: dict) -> None:
        """After an SGD step, the stepped params' state points at their momentum views."""
        if self.momentum_adopted:
            return
        for i, p in enumerate(self.params):
            if mask[i]:
                state[p]["momentum_buffer"] = self.momentum_views[i]
        self.momentum_adopted = all(mask)  # else params without a buffer remain: keep checking

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """One fill over the grad buffer. With ``set_to_none`` (torch's default) params count
        as gradient-less until a backward reaches them, as if their grad were None."""
        for i, p in enumerate(self.params):
            if not self.hooked[i]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad.zero_()
            elif p.grad is not self.grad_views[i]:
                p.grad = self.grad_views[i]
        self.grad.zero_()
        if set_to_none:
            self.received = [False] * len(self.params)
