"""The fused backends' shared orchestration over flat buffers.

A fused backend is this class over one implementation of the op contract of
``samfast/ops.py``: ``torch.ops.samfast`` (the native C++/CUDA kernels) or
``torch.ops.samfast_triton`` (the Triton kernels). The ops work on 1-D slices of the flat
buffers of ``samfast/flat.py``; the plain restore is a torch copy.

Per step the memory traffic, in units of one parameter-sized buffer P, is: norm 1 (read g),
ascent 4 (read w, g; write backup, w), finiteness check 1 (read g), restore + SGD with momentum
5 (read backup, g, buf; write w, buf): 11 P, against 5 P for one fused SGD step (read w, g,
buf; write w, buf). Moving each fresh gradient into the flat buffer after its backward costs
a copy of a gradient autograd has just written (in cache for all but the largest layers).

Skip decisions stay on the device (flags computed from N and the second-pass gradients), so a
CUDA step has no host sync; on the CPU they are turned into Python bools at once, which costs
nothing and lets ``step(closure)`` skip the second pass exactly like the reference backend.

LookSAM (samfast/policies.py; the maths in samfast/backends/reference.py) adds the g_v buffer,
one more P, and per full step: copy g into it (2 P), ``looksam_dots`` (read g, g_s: 2 P) and
``looksam_project_`` (read g_v, g_s; write g_v: 3 P): 18 P. A reuse step: ||g|| (1 P),
``looksam_reuse_`` (read g, g_v; write g: 3 P), then the base step (6 P with SGD momentum):
10 P. ||g_v||^2 and whether g_v is valid stay on the device, so neither step syncs.

FSDP2 (samfast/fsdp.py): the buckets are flat mirrors of the local shards
(``samfast.flat.ShardedFlatBucket``): the weights are gathered into them before a step reads
them and scattered back after the ascent and after the update (3 more copies of the shard,
one read and one write each), the gradients are copied in; the sums of squares (N, AE-SAM's
||g||^2) and the non-finite flags are all-reduced over the mesh, unconditionally on every
rank (a rank whose shards are empty contributes zeros), so that every rank takes the same
decisions. (LookSAM is refused under FSDP2: its dot products are not sharded.)
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor

from ..flat import FlatBucket, ShardedFlatBucket
from .reference import ascent_scale, compute_dtype


def _host_flag(flag: Tensor) -> bool | Tensor:
    return bool(flag) if flag.device.type == "cpu" else flag


class FusedBackend:
    def __init__(self, name: str, ops) -> None:
        self.name = name
        self.ops = ops
        self.buckets: list[FlatBucket] = []
        self._index: dict[Tensor, tuple[FlatBucket, int]] = {}
        self._optimizer_ref = None
        self._skip: Tensor | None = None
        self._lr_cache: dict[torch.device, tuple[float, Tensor]] = {}
        self._flags: dict[torch.device, Tensor] = {}
        self._warned_sync = False
        # LookSAM: ||g_v||^2 and whether g_v is valid, 0-d tensors on the first bucket's device
        self._gv_sq: Tensor | None = None
        self._gv_valid: Tensor | None = None
        self._sharding = None  # FSDP2: samfast.fsdp.Sharding (set by bind)

    @property
    def _optimizer(self):
        # A weak reference: the optimizer owns the backend, so a strong one would be a cycle
        # that keeps every buffer alive until the garbage collector runs.
        return self._optimizer_ref()

    # -- set-up -------------------------------------------------------------------------------

    def bind(self, optimizer) -> None:
        self._optimizer_ref = weakref.ref(optimizer)
        self._sharding = optimizer._sharding
        for index in range(len(optimizer.param_groups)):
            self.add_group(index)

    def add_group(self, index: int) -> None:
        group = self._optimizer.param_groups[index]
        by_key: dict = {}
        for p in group["params"]:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        for params in by_key.values():
            bucket = (FlatBucket(params, index) if self._sharding is None
                      else ShardedFlatBucket(params, index))
            self.buckets.append(bucket)
            for i, p in enumerate(params):
                self._index[p] = (bucket, i)

    def on_grad(self, p: Tensor) -> None:
        """A backward reached ``p`` (its post-accumulate-grad hook)."""
        entry = self._index.get(p)
        if entry is not None:
            entry[0].adopt_grad(entry[1])

    @property
    def _sgd_fast_path(self) -> bool:
        # Exactly torch.optim.SGD: a subclass may change the update.
        return type(self._optimizer.base_optimizer) is torch.optim.SGD

    def state_replaced(self) -> None:
        """The optimizer's state was replaced (load_state_dict, reset): adopt its buffers."""
        if self._sgd_fast_path:
            for bucket in self.buckets:
                bucket.adopt_state(self._optimizer.state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for bucket in self.buckets:
            bucket.zero_grad(set_to_none)

    def unstarted_momentum(self) -> list[Tensor]:
        """Params whose state shows a momentum view that has not started (their first step
        was skipped): torch would have no buffer for them yet."""
        if not self._sgd_fast_path:
            return []
        return [p for b in self.buckets if b.momentum is not None
                for p, published, unstarted in zip(b.params, b.published, b.unstarted())
                if published and unstarted]

    def _flag(self, value: bool, device: torch.device) -> Tensor:
        """A constant one-element bool tensor on ``device`` (cached; made by a fill, not a
        copy from the host, so that even a CUDA graph capturing the first step can make it)."""
        key = (device, value)
        t = self._flags.get(key)
        if t is None:
            t = self._flags[key] = torch.full((), value, dtype=torch.bool, device=device)
        return t

    # -- FSDP2: the local shards' mirror and the sums over the ranks ------------------------

    def _gather(self) -> None:
        """FSDP2: the shards' weights into the flat buffers, before a step reads them."""
        if self._sharding is not None:
            for bucket in self.buckets:
                bucket.gather()

    def _scatter(self) -> None:
        """FSDP2: the flat buffers' weights back into the shards, after the step wrote them."""
        if self._sharding is not None:
            for bucket in self.buckets:
                bucket.scatter()

    def _sum_of(self, terms: list[Tensor], dtype: torch.dtype, device) -> Tensor:
        """The sum of 0-d ``terms`` (zero when there are none: a rank whose shards are empty),
        over every rank under FSDP2 (one all-reduce of the partial sums)."""
        total = (torch.stack([t.to(device, dtype) for t in terms]).sum() if terms
                 else torch.zeros((), dtype=dtype, device=device))
        if self._sharding is not None:
            self._sharding.sum_(total)
        return total

    # -- the step -----------------------------------------------------------------------------

    def first_step(self, groups: list[dict], agree_skip=None,
                   store_grad: bool = False) -> bool | Tensor:
        self._gather()
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
        norm = self._sum_of(terms, acc, device).sqrt()
        skip = ~torch.isfinite(norm)
        if agree_skip is not None:
            agree_skip(skip)
        for bucket, mask in zip(self.buckets, masks):
            group = groups[bucket.group_index]
            scale = ascent_scale(group, norm, compute_dtype(bucket.dtype), bucket.device)
            bskip = skip.to(bucket.device)
            for s, e in bucket.runs(mask):
                self.ops.ascent_(bucket.param[s:e], bucket.grad[s:e], bucket.backup[s:e], scale,
                                 bskip, group["adaptive"], float(group["eta"]))
            # Params without a gradient are not perturbed; their backup must still equal w so
            # that the restore is right whichever params get a gradient in the second pass.
            for s, e in bucket.inactive_runs(mask):
                bucket.backup[s:e].copy_(bucket.param[s:e])
        self._scatter()  # FSDP2: the second forward all-gathers w + e
        if store_grad:
            self._store_grad(masks)
        self._skip = skip
        return _host_flag(skip)

    def abort(self) -> None:
        """Between the passes: put back the weights the ascent saved (all of them: the ascent
        wrote the backup of every element)."""
        for bucket in self.buckets:
            bucket.param.copy_(bucket.backup)
        self._scatter()
        self._skip = None

    def _nonfinite_flag(self, masks: list[list[bool]], device: torch.device) -> Tensor:
        counts = [self.ops.nonfinite(b.grad[s:e]).to(device)
                  for b, m in zip(self.buckets, masks) for s, e in b.runs(m)]
        flag = (torch.stack(counts).sum() > 0 if counts
                else torch.zeros((), dtype=torch.bool, device=device))
        if self._sharding is not None:  # one rank's shard may hold the only bad entry
            self._sharding.any_(flag)
        return flag

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
        for bucket, mask in zip(self.buckets, masks):
            group = groups[bucket.group_index]
            momentum = float(group["momentum"])
            source = bucket.backup if restore else bucket.param
            bskip = skip.to(bucket.device)
            lr = self._lr_tensor(group["lr"], bucket.device)
            if momentum != 0:
                runs = bucket.momentum_runs(mask)
                buf = bucket.momentum
            else:  # neither read nor written by the kernel
                runs = [(s, e, self._flag(False, bucket.device)) for s, e in bucket.runs(mask)]
                buf = bucket.param
            for s, e, started in runs:
                self.ops.restore_sgd_(bucket.param[s:e], bucket.grad[s:e], source[s:e],
                                      buf[s:e], bskip, lr, momentum,
                                      float(group["dampening"]), float(group["weight_decay"]),
                                      bool(group["nesterov"]), started)
            if restore:
                for s, e in bucket.inactive_runs(mask):
                    bucket.param[s:e].copy_(bucket.backup[s:e])
            if momentum != 0 and any(mask):
                bucket.momentum_stepped(mask, _host_flag(bskip), state)
        self._scatter()

    def second_step(self, groups: list[dict], base_step,
                    project: bool = False) -> bool | Tensor:
        masks = [b.active_mask() for b in self.buckets]
        device = self._skip.device
        skip = self._skip | self._nonfinite_flag(masks, device)
        self._skip = None
        if project:
            self._project(masks, skip)
        if self._sgd_fast_path:
            self._sgd_update(groups, masks, skip, restore=True)
        else:  # the base optimizer steps the params (under FSDP2 the shards: scattered first)
            for bucket in self.buckets:
                bucket.param.copy_(bucket.backup)
            self._scatter()
            self._base_step(base_step, skip)
        return _host_flag(skip)

    def _base_step(self, base_step, skip: Tensor) -> None:
        """The base optimizer's own step on the params with a gradient, unless ``skip``. A
        fused torch optimizer (``fused=True``: Adam, AdamW, SGD...) takes the flag on the
        device, as GradScaler hands it ``found_inf``; any other needs it on the host, which
        on CUDA is one sync per step (warned once)."""
        base = self._optimizer.base_optimizer
        on_device = (skip.device.type != "cpu"
                     and getattr(base, "_step_supports_amp_scaling", False)
                     and all(g.get("fused") for g in base.param_groups))
        if not on_device:
            if skip.device.type != "cpu" and not self._warned_sync:
                warnings.warn(f"samfast: {type(base).__name__} takes SAM's skip decision on the "
                              "host: one CUDA sync per step. Pass fused=True to the base "
                              "optimizer to keep the step on the device.", stacklevel=5)
                self._warned_sync = True
            if bool(skip):
                return
            base_step()  # params without a gradient have grad None: it skips them
            return
        base.grad_scale, base.found_inf = None, skip.float()
        try:
            base_step()
        finally:
            del base.grad_scale, base.found_inf

    def base_step(self, groups: list[dict], base_step, reuse=None) -> bool | Tensor:
        """The base step; ``reuse`` = (alpha, eps): a LookSAM step between full ones, whose
        gradient g + alpha ||g|| / (||g_v|| + eps) g_v is made in place first."""
        masks = [b.active_mask() for b in self.buckets]
        if not any(any(m) for m in masks):
            return False
        if self._sgd_fast_path:
            self._gather()  # FSDP2: the fused update reads the weights from the flat buffer
        device = next(b.device for b, m in zip(self.buckets, masks) if any(m))
        skip = self._nonfinite_flag(masks, device)
        if reuse is not None:
            skip = skip | self._reuse(masks, *reuse).to(device)
        if self._sgd_fast_path:
            self._sgd_update(groups, masks, skip, restore=False)
        else:
            self._base_step(base_step, skip)
        return _host_flag(skip)


    # -- LookSAM ------------------------------------------------------------------------------

    def missing_ops(self, names) -> list[str]:
        """The ops of ``names`` this backend's namespace has no kernel for on its devices
        (a samfast._C built before they existed)."""
        keys = {"CUDA" if b.device.type == "cuda" else "CPU" for b in self.buckets} or {"CPU"}
        return [name for name in names for key in sorted(keys)
                if not torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"{self.ops.name}::{name}", key)]

    def _gv_flags(self) -> None:
        if self._gv_sq is None:
            device = self.buckets[0].device
            acc = (torch.float64 if any(b.dtype == torch.float64 for b in self.buckets)
                   else torch.float32)
            self._gv_sq = torch.zeros((), dtype=acc, device=device)
            self._gv_valid = torch.zeros((), dtype=torch.bool, device=device)

    def _store_grad(self, masks: list[list[bool]]) -> None:
        """A full step's first pass: the g_v buffer takes g (zero where a param has no
        gradient), which the projection turns into g_v; until then g_v is not valid."""
        self._gv_flags()
        for bucket, mask in zip(self.buckets, masks):
            bucket.ensure_gv()
            for s, e in bucket.runs(mask):
                bucket.gv[s:e].copy_(bucket.grad[s:e])
            for s, e in bucket.inactive_runs(mask):
                bucket.gv[s:e].zero_()
        self._gv_valid.fill_(False)

    def _project(self, masks: list[list[bool]], skip: Tensor) -> None:
        """g_v <- g_s - (g . g_s / ||g||^2) g over every param (a missing g_s is zero), unless
        ``skip``; then g_v is valid unless ``skip``."""
        sq, device = self._gv_sq, self._gv_sq.device
        dots, squares = [], []
        for bucket, mask in zip(self.buckets, masks):
            for s, e in bucket.runs(mask):
                both = self.ops.looksam_dots(bucket.gv[s:e], bucket.grad[s:e]).to(device, sq.dtype)
                dots.append(both[0])
                squares.append(both[1])
            for s, e in bucket.inactive_runs(mask):
                squares.append(self.ops.sq_norm(bucket.gv[s:e], bucket.gv[s:e], False, 0.0)
                               .to(device, sq.dtype))
        dot = torch.stack(dots).sum() if dots else torch.zeros_like(sq)
        gg = torch.stack(squares).sum()
        coef = torch.where(gg > 0, dot / gg, torch.zeros_like(gg))  # g = 0: g_v = g_s
        stored = []
        for bucket, mask in zip(self.buckets, masks):
            c = coef.to(bucket.device, compute_dtype(bucket.dtype))
            bskip = skip.to(bucket.device)
            for s, e in bucket.runs(mask):
                stored.append(self.ops.looksam_project_(bucket.gv[s:e], bucket.grad[s:e], c,
                                                        bskip))
            for s, e in bucket.inactive_runs(mask):  # rare: a param without g_s
                zeros = torch.zeros_like(bucket.gv[s:e])
                stored.append(self.ops.looksam_project_(bucket.gv[s:e], zeros, c, bskip))
        sq.copy_(torch.stack([t.to(device, sq.dtype) for t in stored]).sum())
        self._gv_valid.copy_(~skip.to(device))

    def _reuse(self, masks: list[list[bool]], alpha: float, eps: float) -> Tensor:
        """g <- g + alpha ||g|| / (||g_v|| + eps) g_v over the params with a gradient, unless
        ||g|| is not finite (returned as the step's skip flag) or g_v is not valid."""
        self._gv_flags()
        sq = self._gv_sq
        terms = [self.ops.sq_norm(b.grad[s:e], b.grad[s:e], False, 0.0).to(sq.device, sq.dtype)
                 for b, m in zip(self.buckets, masks) for s, e in b.runs(m)]
        gnorm = torch.stack(terms).sum().sqrt()
        norm_skip = ~torch.isfinite(gnorm)
        if all(b.gv is None for b in self.buckets):
            return norm_skip
        coef = alpha * gnorm / (sq.sqrt() + eps)
        reuse_skip = norm_skip | ~self._gv_valid
        for bucket, mask in zip(self.buckets, masks):
            if bucket.gv is None:  # a group added since the last full step: g_v is not valid
                continue
            c = coef.to(bucket.device, compute_dtype(bucket.dtype))
            bskip = reuse_skip.to(bucket.device)
            for s, e in bucket.runs(mask):
                self.ops.looksam_reuse_(bucket.grad[s:e], bucket.gv[s:e], c, bskip)
        return norm_skip

    def grad_sq_norm(self, groups: list[dict]) -> Tensor:
        """||g||^2 over the params with a gradient (AdaptiveSAM's statistic), on the device."""
        masks = [b.active_mask() for b in self.buckets]
        active = [(b, m) for b, m in zip(self.buckets, masks) if any(m)]
        if not active:
            raise RuntimeError("SAM: no parameter has a gradient; call loss.backward() first")
        device = active[0][0].device
        acc = torch.float64 if any(b.dtype == torch.float64 for b, _ in active) else torch.float32
        return self._sum_of([self.ops.sq_norm(b.grad[s:e], b.grad[s:e], False, 0.0)
                             for b, m in active for s, e in b.runs(m)], acc, device)

    def looksam_state(self, params: list[Tensor]) -> dict:
        """g_v per param (views of the flat buffer; None where none is allocated), ||g_v||^2
        and whether g_v is valid."""
        views = {}
        for bucket in self.buckets:
            if bucket.gv is not None:
                views.update(zip(map(id, bucket.params), bucket.gv_views))
        valid = self._gv_valid if self._gv_valid is not None else torch.tensor(False)
        return {"gv": [views.get(id(p)) for p in params], "gv_sq_norm": self._gv_sq,
                "gv_valid": valid}  # before the first full step: no g_v, not valid

    @torch.no_grad()
    def load_looksam_state(self, params: list[Tensor], state: dict) -> None:
        loaded = dict(zip(map(id, params), state["gv"]))
        for bucket in self.buckets:
            bucket.ensure_gv()
            for p, view in zip(bucket.params, bucket.gv_views):
                gv = loaded.get(id(p))
                if gv is None:
                    view.zero_()
                elif gv is not view:
                    view.copy_(gv)
        self._gv_flags()
        complete = all(gv is not None for gv in state["gv"]) and state["gv_sq_norm"] is not None
        if state["gv_sq_norm"] is not None:
            self._gv_sq.copy_(state["gv_sq_norm"])
        self._gv_valid.copy_(torch.as_tensor(state["gv_valid"]) & complete)

    def invalidate_gv(self) -> None:
        """LookSAM's g_v is not reused: reuse steps are base steps until the next full step
        (a no-op without LookSAM)."""
        if self._gv_valid is not None:
            self._gv_valid.fill_(False)

    def release_gv(self) -> None:
        for bucket in self.buckets:
            bucket.release_gv()
        self._gv_sq = self._gv_valid = None
