"""Per-rank memory of SAM's state under FSDP2 (fully_shard), against the unsharded optimizer.

SAM over SGD with momentum keeps two parameter-sized tensors: the momentum buffer (the base
optimizer's state, between steps) and the backup of w (between ``first_step`` and
``second_step``). Under FSDP2 both are sharded like the params. For each world size this
script spawns that many gloo processes on the CPU, runs a few SAM steps of ResNet-20 and counts,
on every rank, the bytes of the local tensors: the params' shards, the momentum buffers'
shards and the ascent's backups (read from the reference backend between the two passes).
The unsharded row is single-process SAM (reference backend) on the same model. The counts are
exact tensor sizes, not a memory profiler's reading, so they do not depend on the machine.

    python bench/bench_fsdp_memory.py [--worlds 2 3 4] [--model resnet20] [--save]
"""

from __future__ import annotations

import argparse
import os
import socket
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
BATCH_PER_RANK = 8


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model(name: str):
    torch.manual_seed(0)
    return build_model(name)


def measure(model, rank: int, world: int) -> dict:
    """A few SAM steps; the bytes of this rank's params, momentum and backups."""
    opt = samfast.SAM(model.parameters(), backend="reference", lr=0.05, momentum=0.9)
    backups = 0
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        x = torch.rand(BATCH_PER_RANK * world, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH_PER_RANK * world,), generator=gen)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        opt.first_step(zero_grad=True)
        backups = max(backups, _bytes(opt._backend._backups))  # w, saved until second_step
        F.cross_entropy(model(xs), ys).backward()
        opt.second_step(zero_grad=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"params": _bytes(local(p) for p in params),
            "momentum": _bytes(local(opt.state[p]["momentum_buffer"]) for p in params),
            "backups": backups}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _model(name)
        for module in model.modules():  # each residual block its own FSDP unit, then the root
            if type(module).__name__ == "_BasicBlock":
                fully_shard(module)
        fully_shard(model)
        counts = measure(model, rank, world)
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
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--save", action="store_true", help="write bench/results/fsdp_memory-*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    unsharded = measure(_model(args.model), 0, 1)
    rows, raw = [], {"unsharded": unsharded}
    state = unsharded["momentum"] + unsharded["backups"]
    rows.append(["1 (no FSDP)", "-", f"{unsharded['params'] / 2**20:.3f}",
                 f"{unsharded['momentum'] / 2**20:.3f}", f"{unsharded['backups'] / 2**20:.3f}",
                 f"{state / 2**20:.3f}", "1.000"])
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "counts.pt")
            mp.spawn(_worker, args=(world, _free_port(), args.model, out), nprocs=world,
                     join=True)
            per_rank = torch.load(out)
        raw[f"world{world}"] = per_rank
        for rank, c in enumerate(per_rank):
            rank_state = c["momentum"] + c["backups"]
            rows.append([str(world), str(rank), f"{c['params'] / 2**20:.3f}",
                         f"{c['momentum'] / 2**20:.3f}", f"{c['backups'] / 2**20:.3f}",
                         f"{rank_state / 2**20:.3f}", f"{rank_state / state:.3f}"])
    table = markdown_table(["world", "rank", "params MiB", "momentum MiB", "SAM backup MiB",
                            "optimizer state MiB", "x unsharded"], rows)
    print(f"{args.model}, SAM over SGD with momentum, fp32 (reference backend)\n")
    print(table)
    if args.save:
        env = environment(torch.device("cpu"))
        path = write_results("fsdp_memory", env, f"{args.model}, SAM over SGD with momentum, "
                             f"fp32 (reference backend)\n\n{table}", raw, None)
        print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
