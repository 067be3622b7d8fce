"""Per-rank memory of SAM's state under FSDP2 (fully_shard), against the unsharded optimizer.

SAM over SGD with momentum keeps two parameter-sized tensors: the momentum buffer (the base
optimizer's state, between steps) and the backup of w (between ``first_step`` and
``second_step``). Under FSDP2 both are sharded like the params. For each world size this
script spawns that many gloo processes on the CPU, runs a few SAM steps of ResNet-20 and counts,
on every rank, the bytes of the local tensors: the params' shards, the momentum buffers'
shards and the ascent's backups (read from the reference backend between the two passes).
The unsharded row is single-process SAM on the same model. The counts are exact tensor sizes,
not a memory profiler's reading, so they do not depend on the machine.

Per backend: the reference keeps momentum (torch's SGD) and backups as tensors like the
params; a fused backend keeps both in its flat buffers (with their 16-element alignment
padding), and under FSDP2 also a flat mirror of the local shards and of their gradients
(samfast.flat.ShardedFlatBucket: FSDP2 all-gathers from shard buffers it owns), counted as
"flat mirrors".

With ``--time``, each world size also times the optimizer's side of a SAM step (first_step +
second_step: norm and its all-reduce, ascent, copies in and out of the mirrors, restore and
SGD update; not the forward and backward passes) on every backend, the backends' steps
interleaved in one process per rank so that a slow spell of a shared machine hits all of
them; the median over steps of the slowest rank's time, and the ratio to the reference.

    python bench/bench_fsdp_memory.py [--worlds 2 3 4] [--backends reference native] [--time]
                                      [--save]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samfast  # noqa: E402
from common import environment, markdown_table, write_results  # noqa: E402
from samfast.cifar.models import build_model  # noqa: E402
from samfast.fsdp import local  # noqa: E402

STEPS = 2
TIMED_STEPS = 30
BATCH_PER_RANK = 8


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model(name: str):
    torch.manual_seed(0)
    return build_model(name)


def _sharded_model(name: str):
    """The model with each residual block its own FSDP2 unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    model = _model(name)
    for module in model.modules():
        if type(module).__name__ == "_BasicBlock":
            fully_shard(module)
    fully_shard(model)
    return model


def measure(model, rank: int, world: int, backend: str) -> dict:
    """A few SAM steps; the bytes of this rank's params, momentum, backups and flat mirrors."""
    opt = samfast.SAM(model.parameters(), backend=backend, lr=0.05, momentum=0.9)
    fused = backend != "reference"
    backups = 0
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        x = torch.rand(BATCH_PER_RANK * world, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH_PER_RANK * world,), generator=gen)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        opt.first_step(zero_grad=True)
        backups = max(backups, _bytes(  # w, saved until second_step
            [b.backup for b in opt._backend.buckets] if fused else opt._backend._backups))
        F.cross_entropy(model(xs), ys).backward()
        opt.second_step(zero_grad=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    if fused:
        buckets = opt._backend.buckets
        momentum = _bytes(b.momentum for b in buckets)
        mirrors = _bytes(t for b in buckets if opt._sharding is not None
                         for t in (b.param, b.grad))
    else:
        momentum = _bytes(local(opt.state[p]["momentum_buffer"]) for p in params)
        mirrors = 0
    return {"params": _bytes(local(p) for p in params), "momentum": momentum,
            "backups": backups, "mirrors": mirrors}


def time_steps(name: str, rank: int, world: int, backends: list[str], steps: int) -> dict:
    """Seconds of each backend's optimizer side per SAM step (see the module docstring),
    the backends interleaved step by step on identical sharded models."""
    import time

    runs = []
    for backend in backends:
        model = _sharded_model(name)
        runs.append((backend, model, samfast.SAM(model.parameters(), backend=backend, lr=0.05,
                                                 momentum=0.9)))
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    for step in range(steps + 2):  # the first two are warm-up
        gen = torch.Generator().manual_seed(step)
        x = torch.rand(BATCH_PER_RANK * world, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH_PER_RANK * world,), generator=gen)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for backend, model, opt in runs:
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            dist.barrier()
            t0 = time.perf_counter()
            opt.first_step(zero_grad=True)
            spent = time.perf_counter() - t0
            F.cross_entropy(model(xs), ys).backward()
            dist.barrier()
            t0 = time.perf_counter()
            opt.second_step(zero_grad=True)
            spent += time.perf_counter() - t0
            if step >= 2:
                seconds[backend].append(spent)
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, name: str, backend, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        counts = (time_steps(name, rank, world, backend, TIMED_STEPS)
                  if isinstance(backend, list)
                  else measure(_sharded_model(name), rank, world, backend))
        gathered = [None] * world
        dist.all_gather_object(gathered, counts)
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()  # all collectives done before any rank tears gloo down
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--backends", nargs="+", default=["reference", "native"])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--time", action="store_true", help="also time the optimizer side")
    parser.add_argument("--save", action="store_true", help="write bench/results/fsdp_memory-*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, raw = [], {}

    def mib(n: int) -> str:
        return f"{n / 2**20:.3f}"

    for backend in args.backends:
        unsharded = measure(_model(args.model), 0, 1, backend)
        raw[backend] = {"unsharded": unsharded}
        state = unsharded["momentum"] + unsharded["backups"] + unsharded["mirrors"]
        rows.append([backend, "1 (no FSDP)", "-", mib(unsharded["params"]),
                     mib(unsharded["momentum"]), mib(unsharded["backups"]),
                     mib(unsharded["mirrors"]), mib(state), "1.000"])
        for world in args.worlds:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "counts.pt")
                mp.spawn(_worker, args=(world, _free_port(), args.model, backend, out),
                         nprocs=world, join=True)
                per_rank = torch.load(out)
            raw[backend][f"world{world}"] = per_rank
            for rank, c in enumerate(per_rank):
                rank_state = c["momentum"] + c["backups"] + c["mirrors"]
                rows.append([backend, str(world), str(rank), mib(c["params"]),
                             mib(c["momentum"]), mib(c["backups"]), mib(c["mirrors"]),
                             mib(rank_state), f"{rank_state / state:.3f}"])
    table = markdown_table(["backend", "world", "rank", "params MiB", "momentum MiB",
                            "SAM backup MiB", "flat mirrors MiB", "optimizer state MiB",
                            "x unsharded (same backend)"], rows)
    title = f"{args.model}, SAM over SGD with momentum, fp32"
    text = f"{title}\n\n{table}"
    if args.time:
        rows = []
        for world in args.worlds:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "times.pt")
                mp.spawn(_worker, args=(world, _free_port(), args.model, args.backends, out),
                         nprocs=world, join=True)
                per_rank = torch.load(out)
            raw[f"times_world{world}"] = per_rank
            slowest = {b: [max(r[b][i] for r in per_rank) for i in range(TIMED_STEPS)]
                       for b in args.backends}
            base = statistics.median(slowest[args.backends[0]])
            for b in args.backends:
                med = statistics.median(slowest[b])
                rows.append([str(world), b, f"{1e3 * med:.2f}", f"{base / med:.2f}"])
        text += ("\n\nOptimizer side of a SAM step under FSDP2 (first_step + second_step, "
                 f"no forward/backward), median of {TIMED_STEPS} steps of the slowest rank, "
                 f"{BATCH_PER_RANK} images per rank, gloo, 1 thread per rank, the backends "
                 "interleaved:\n\n" + markdown_table(
                     ["world", "backend", "ms", f"speed-up vs {args.backends[0]}"], rows))
    print(text)
    if args.save:
        env = environment(torch.device("cpu"))
        path = write_results("fsdp_memory", env, text, raw, None)
        print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
