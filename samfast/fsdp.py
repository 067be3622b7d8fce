"""SAM on FSDP2 models (``torch.distributed.fsdp.fully_shard``): params that are sharded DTensors.

Under FSDP2 every rank holds a shard of every parameter and of its gradient (the gradient
reduce-scattered, i.e. already averaged over the ranks). One SAM step then is:

* N, the norm of T(w)·g over every param, is the global one: each rank computes the sum of
  squares over its local shards and one all-reduce (SUM) over the mesh adds them up. ASAM's
  T(w) = |w| + eta is elementwise, so it is computed on the shards too.
* The ascent w <- w + e and the restore touch only the local shards, in place (``to_local()``
  is a view of the shard FSDP2 all-gathers from), so the second forward gathers w + e.
* The base optimizer steps the DTensors themselves (torch.optim supports them); its state
  (e.g. SGD's momentum) is sharded like the params, so each rank holds 1/world of it.
* Skip decisions agree across ranks: a non-finite N is non-finite everywhere (the all-reduced
  sum propagates it), and the non-finite check of a gradient is all-reduced (MAX) before the
  base step, since one rank's shard may hold the only bad entry.

Every backend runs this. The reference works on the local shards with foreach ops; a fused
backend runs its kernels on flat mirrors of the local shards and their gradients
(``samfast.flat.ShardedFlatBucket``): FSDP2 keeps each param's shard in its own padded
allocation and all-gathers from it, so the shards cannot be views of a buffer samfast owns
without FSDP2's private state; the mirror costs three copies of the shard per step and two
more shard-sized buffers (bench/results/fsdp_memory-*: 1.8x faster than the reference on the
optimizer's side on the CPU, at twice its per-rank state), so ``backend="auto"`` picks the
reference for FSDP2 params (warning once) and the fused ones are opt-in.

Checkpoints: :func:`save` and :func:`load` write and read the standard sharded checkpoint of
``torch.distributed.checkpoint`` (each rank its shards of the weights and optimizer state);
:func:`full_optimizer_state` and :func:`shard_optimizer_state` convert the optimizer's state
to and from full tensors, for a single-file checkpoint (samfast-train ``--fsdp``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _dtensor_type():
    """``DTensor``, or None when ``torch.distributed.tensor`` was never imported (then no
    DTensor exists, and ``import samfast`` does not pay for importing it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard (a view of it, so in-place
    ops write the shard), any other tensor itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


@dataclass(frozen=True)
class Sharding:
    """How the params of a SAM are sharded: over ``group`` (the process group of the mesh
    dimension that shards them), the one all-reduce a norm or a skip flag needs."""

    mesh: Any
    group: Any

    def sum_(self, t: Tensor) -> None:
        """In place: the sum of ``t`` over the ranks (partial sums of the local shards)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def any_(self, flag: Tensor) -> None:
        """In place: a 0-d bool flag set on every rank when it is set on any."""
        as_int = flag.to(torch.uint8)  # all-reduce has no MAX for bool on every backend
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX, group=self.group)
        flag.copy_(as_int.bool())


def sharding_of(params: Iterable[Tensor]) -> Sharding | None:
    """None for plain tensors; the :class:`Sharding` of FSDP2's DTensor params; a
    ``ValueError`` naming what is not supported (a mix of both, several meshes, HSDP and other
    multi-dimensional meshes, placements other than ``Shard``)."""
    params = list(params)
    dtensor = _dtensor_type()
    sharded = [p for p in params if dtensor is not None and isinstance(p, dtensor)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError("Invalid params: some are DTensors (FSDP2 fully_shard) and some plain "
                         "tensors; shard the whole model (call fully_shard on the root too)")
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh != mesh:
            raise ValueError("Invalid params: DTensor params on different device meshes are not "
                             "supported (one all-reduce over one mesh computes the norm)")
        if mesh.ndim != 1:
            raise ValueError(f"Invalid params: a {mesh.ndim}-dimensional device mesh (HSDP, or "
                             "FSDP with tensor parallelism) is not supported yet; samfast.SAM "
                             "supports FSDP2 over a 1-dimensional mesh")
        if not all(placement.is_shard() for placement in p.placements):
            raise ValueError(f"Invalid params: DTensor placements {p.placements} are not "
                             "supported (FSDP2's Shard placements are)")
    return Sharding(mesh, mesh.get_group(0))


def check_ascent(optimizer, ascent: str) -> None:
    """``samfast.distributed.sam_step``'s ``ascent`` under FSDP2: only ``"global"``."""
    if ascent == "local" and getattr(optimizer, "_sharding", None) is not None:
        raise ValueError("Invalid ascent: 'local' (a per-replica ascent) is not supported with "
                         "FSDP2 (fully_shard): every rank holds a shard of one replica, whose "
                         "gradient is reduce-scattered in the backward; use ascent='global' "
                         "(equal to single-process SAM on the whole batch)")


# -- checkpoints ----------------------------------------------------------------------------

def _state_dicts(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": get_model_state_dict(model), "optim": optimizer.state_dict()}


def save(model: nn.Module, optimizer, checkpoint_id) -> None:
    """Write ``model``'s and ``optimizer``'s (a :class:`samfast.SAM`) state as a sharded
    ``torch.distributed.checkpoint`` in the folder ``checkpoint_id`` (every rank calls it and
    writes its own shards). Call it between steps, not between ``first_step`` and
    ``second_step``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, optimizer), checkpoint_id=checkpoint_id)


_STATE_KEY = re.compile(r"optim\.state\.(\d+)\.(\w+)$")


def load(model: nn.Module, optimizer, checkpoint_id) -> None:
    """Load a checkpoint written by :func:`save` into ``model`` and ``optimizer``, resharded to
    the current meshes by ``torch.distributed.checkpoint``; training resumes bit-identically.

    ``dcp.load`` fills a state dict of the right structure in place; a fresh optimizer has no
    per-param state yet (torch creates it at the first step), so the entries the checkpoint
    holds (e.g. ``momentum_buffer``) are made from its metadata, each like its param."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = _state_dicts(model, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    for key, meta in metadata.items():
        match = _STATE_KEY.match(key)
        if match is None:
            continue
        i, name = int(match[1]), match[2]
        if i >= len(params):
            raise ValueError(f"Invalid checkpoint: state for param {i}, the optimizer has "
                             f"{len(params)}")
        if not isinstance(meta, TensorStorageMetadata):
            value = None  # a Python value: dcp.load replaces it
        elif tuple(meta.size) == tuple(params[i].shape):
            value = torch.zeros_like(params[i], dtype=meta.properties.dtype)  # sharded like it
        else:
            value = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
        per_param.setdefault(i, {})[name] = value
    state["optim"]["state"] = per_param
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict(state["optim"])


# -- full (unsharded) state, for a single-file checkpoint -------------------------------------

def full_optimizer_state(state: dict) -> dict:
    """``SAM.state_dict()`` with every DTensor gathered into a full CPU tensor: the state dict
    the same optimizer has without FSDP. A collective: every rank calls it, in step."""
    dtensor = _dtensor_type()

    def full(value):
        if dtensor is not None and isinstance(value, dtensor):
            return value.full_tensor().cpu()
        if isinstance(value, dict):
            return {k: full(v) for k, v in value.items()}
        if isinstance(value, list):
            return [full(v) for v in value]
        return value
    return full(state)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """The inverse of :func:`full_optimizer_state` for ``optimizer`` (a SAM over FSDP2 params):
    each per-param tensor of its param's shape becomes a DTensor sharded like the param (this
    rank's chunk of the full tensor every rank holds; no communication), ready for
    ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor_type()
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def shard(p, value):
        if (dtensor is None or not isinstance(p, dtensor) or not isinstance(value, Tensor)
                or isinstance(value, dtensor) or value.shape != p.shape):
            return value
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                 src_data_rank=None)

    per_param = {}
    for key, entry in state.get("state", {}).items():
        p = params[key] if isinstance(key, int) and 0 <= key < len(params) else None
        per_param[key] = ({name: shard(p, value) for name, value in entry.items()}
                          if p is not None and isinstance(entry, dict) else entry)
    return {**state, "state": per_param}
