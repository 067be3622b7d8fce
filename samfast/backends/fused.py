"""The fused backends' shared orchestration over flat buffers.

A fused backend is this class plus an *ops* object (Triton kernels or the ``samfast._C``
extension) implementing four device kernels over 1-D slices of the flat buffers (the
plain restore is a torch copy):

* ``sq_norm(g, w, adaptive, eta) -> 0-d``: sum of (T(w) g)^2, fp32 (fp64 for fp64 buffers),
  deterministic (per-block partials, then an ordered second reduction; no atomics);
* ``nonfinite(g) -> 0-d fp32``: how many entries of g are inf or NaN;
* ``ascent_(w, g, backup, scale, skip, adaptive, eta)``: backup <- w;
  w <- w + scale * T(w)^2 * g unless ``skip`` (a device flag) is set;
* ``restore_sgd_(w, g, backup, buf, skip, lr, momentum, dampening, weight_decay, nesterov,
  first)``: w <- backup, then torch.optim.SGD's update from there, all in one pass (``lr`` a
  float64 0-d tensor on the buffers' device, read by the kernel); with
  ``skip`` set only the restore happens (buf untouched). ``backup`` may alias ``w`` (a plain
  SGD step).

Per step the memory traffic, in units of one parameter-sized buffer, is: norm 1 (read g),
ascent 4 (read w, g; write backup, w), finiteness check 1 (read g), restore + SGD with momentum
5 (read backup, g, buf; write w, buf): 11, against 5 for one fused SGD step.

Skip decisions stay on the device (flags computed from N and the second-pass gradients), so a
CUDA step has no host sync; on the CPU they are turned into Python bools at once, which costs
nothing and lets ``step(closure)`` skip the second pass exactly like the reference backend.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..flat import FlatBucket
from .reference import compute_dtype


def _host_flag(flag: Tensor) -> bool | Tensor:
    return bool(flag) if flag.device.type == "cpu" else flag


class FusedBackend:
    def __init__(self, name: str, ops) -> None:
        self.name = name
        self.ops = ops
        self.buckets: list[FlatBucket] = []
        self._optimizer = None
        self._skip: Tensor | None = None
        self._masks: list[list[bool]] = []
        self._lr_cache: dict[torch.device, tuple[float, Tensor]] = {}

    # -- set-up -------------------------------------------------------------------------------

    def bind(self, optimizer) -> None:
        self._optimizer = optimizer
        for index in range(len(optimizer.param_groups)):
            self.add_group(index)

    def add_group(self, index: int) -> None:
        group = self._optimizer.param_groups[index]
        buckets: dict = {}
        for p in group["params"]:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        self.buckets += [FlatBucket(params, index) for params in buckets.values()]

    @property
    def _sgd_fast_path(self) -> bool:
        # Exactly torch.optim.SGD: a subclass may change the update.
        return type(self._optimizer.base_optimizer) is torch.optim.SGD

    def state_replaced(self) -> None:
        """The optimizer's state was replaced (load_state_dict): re-adopt momentum buffers."""
        for bucket in self.buckets:
            bucket.momentum_adopted = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        for bucket in self.buckets:
            bucket.zero_grad(set_to_none)

    # -- the step -----------------------------------------------------------------------------

    def first_step(self, groups: list[dict]) -> bool | Tensor:
        masks = [b.active_mask() for b in self.buckets]
        if not any(any(m) for m in masks):
            raise RuntimeError(
                "SAM.first_step: no parameter has a gradient; call loss.backward() first")
        device = next(b.device for b, m in zip(self.buckets, masks) if any(m))
        acc = torch.float64 if any(b.dtype == torch.float64 and any(m)
                                   for b, m in zip(self.buckets, masks)) else torch.float32
        terms = []
        for bucket, mask in zip(self.buckets, masks):
            group = groups[bucket.group_index]
            for s, e in bucket.runs(mask):
                terms.append(self.ops.sq_norm(bucket.grad[s:e], bucket.param[s:e],
                                              group["adaptive"], float(group["eta"])))
        norm = torch.stack([t.to(device, acc) for t in terms]).sum().sqrt()
        skip = ~torch.isfinite(norm)
        for bucket, mask in zip(self.buckets, masks):
            group = groups[bucket.group_index]
            cdtype = compute_dtype(bucket.dtype)
            n = norm.to(bucket.device)
            if group["normalize"]:
                scale = (group["rho"] / (n + group["sam_eps"])).to(cdtype)
            elif isinstance(group["rho"], Tensor):
                scale = group["rho"].detach().to(device=bucket.device, dtype=cdtype)
            else:
                scale = torch.full((), group["rho"], dtype=cdtype, device=bucket.device)
            scale = scale.reshape(())  # rho may be a 1-element tensor
            bskip = skip.to(bucket.device)
            for s, e in bucket.runs(mask):
                self.ops.ascent_(bucket.param[s:e], bucket.grad[s:e], bucket.backup[s:e], scale,
                                 bskip, group["adaptive"], float(group["eta"]))
            # Params without a gradient are not perturbed; their backup must still equal w so
            # that the restore is right whichever params get a gradient in the second pass.
            for s, e in bucket.inactive_runs(mask):
                bucket.backup[s:e].copy_(bucket.param[s:e])
        self._skip = skip
        return _host_flag(skip)

    def _nonfinite_flag(self, masks: list[list[bool]], device: torch.device) -> Tensor:
        counts = [self.ops.nonfinite(b.grad[s:e]).to(device)
                  for b, m in zip(self.buckets, masks) for s, e in b.runs(m)]
        if not counts:
            return torch.zeros((), dtype=torch.bool, device=device)
        return torch.stack(counts).sum() > 0

    def _lr_tensor(self, lr, device: torch.device) -> Tensor:
        """``lr`` as the float64 0-d tensor on ``device`` that the kernels read there. A tensor
        lr (one an LR scheduler updates in place, e.g. for a CUDA graph) is used as it is,
        moved or cast if need be; a float goes into a tensor cached per device (a new one when
        the value changes). No host sync either way."""
        if isinstance(lr, Tensor):
            return lr.detach().to(device=device, dtype=torch.float64).reshape(())
        cached = self._lr_cache.get(device)
        if cached is None or cached[0] != lr:
            cached = (lr, torch.full((), lr, dtype=torch.float64, device=device))
            self._lr_cache[device] = cached
        return cached[1]

    def _sgd_update(self, groups: list[dict], masks: list[list[bool]], skip: Tensor,
                    restore: bool) -> None:
        state = self._optimizer.state
        created = False
        for bucket, mask in zip(self.buckets, masks):
            group = groups[bucket.group_index]
            momentum = float(group["momentum"])
            source = bucket.backup if restore else bucket.param
            if momentum != 0:
                runs = bucket.momentum_runs(mask, state)
                created |= any(first for _, _, first in runs)
                buf = bucket.momentum
            else:
                runs = [(s, e, False) for s, e in bucket.runs(mask)]
                buf = bucket.param  # unused by the kernel
            bskip = skip.to(bucket.device)
            lr = self._lr_tensor(group["lr"], bucket.device)
            for s, e, first in runs:
                self.ops.restore_sgd_(bucket.param[s:e], bucket.grad[s:e], source[s:e],
                                      buf[s:e], bskip, lr, momentum,
                                      float(group["dampening"]), float(group["weight_decay"]),
                                      bool(group["nesterov"]), first)
            if restore:
                for s, e in bucket.inactive_runs(mask):
                    bucket.param[s:e].copy_(bucket.backup[s:e])
        # A momentum buffer comes into being on a param's first real step; publishing it in
        # the state after a skipped step would change the next update (torch starts the
        # buffer as a copy of the update). Only this first step pays a host sync on CUDA.
        if created and bool(skip):
            return
        for bucket, mask in zip(self.buckets, masks):
            if float(groups[bucket.group_index]["momentum"]) != 0:
                bucket.publish_momentum(mask, state)

    def second_step(self, groups: list[dict], base_step) -> bool | Tensor:
        masks = [b.active_mask() for b in self.buckets]
        device = self._skip.device
        skip = self._skip | self._nonfinite_flag(masks, device)
        self._skip = None
        if self._sgd_fast_path:
            self._sgd_update(groups, masks, skip, restore=True)
        else:
            for bucket in self.buckets:
                bucket.param.copy_(bucket.backup)
            if not bool(skip):  # the base optimizer's own step needs the decision on the host
                self._base_step_on_active(masks, base_step)
        return _host_flag(skip)

    def _base_step_on_active(self, masks: list[list[bool]], base_step) -> None:
        with contextlib.ExitStack() as stack:
            for bucket, mask in zip(self.buckets, masks):
                stack.enter_context(bucket.inactive_grads_hidden(mask))
            base_step()

    def base_step(self, groups: list[dict], base_step) -> bool | Tensor:
        masks = [b.active_mask() for b in self.buckets]
        if not any(any(m) for m in masks):
            return False
        device = next(b.device for b, m in zip(self.buckets, masks) if any(m))
        skip = self._nonfinite_flag(masks, device)
        if self._sgd_fast_path:
            self._sgd_update(groups, masks, skip, restore=False)
        elif not bool(skip):
            self._base_step_on_active(masks, base_step)
        return _host_flag(skip)
