"""SAM under DistributedDataParallel with a real process group: the single-GPU NCCL sanity run.

Run under torchrun (``torchrun --standalone --nproc_per_node 1 bench/bench_ddp.py``); it
creates the process group itself (NCCL on CUDA, gloo on the CPU), which samfast-train does not
do for one process. Checks, per samfast backend on the device and per ascent mode
(``global``, ``local``):

  * an all-reduce and a broadcast give the expected values;
  * ``samfast.distributed.sam_step`` on the DDP-wrapped model for a few steps matches the
    same steps on an unwrapped copy (one replica: DDP's averaged gradient is the local one;
    cuDNN is set deterministic, so the two are usually bitwise equal, and they must agree to
    rtol 1e-4 / atol 1e-6 where a non-deterministic kernel remains), and DDP's gradients land
    in the fused backend's flat buffer without a copy;

and times a step with and without DDP, interleaved (one replica: the all-reduce's fixed cost).
Exit status 1 if a check fails.

    torchrun --standalone --nproc_per_node 1 bench/bench_ddp.py [--model resnet20]
        [--batch-size 128] [--steps 5] [--rounds 10] [--device cuda] [--save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samfast  # noqa: E402
from common import environment, markdown_table, write_results  # noqa: E402
from samfast.cifar.models import build_model  # noqa: E402
from samfast.distributed import sam_step  # noqa: E402

SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def collectives(device: torch.device) -> list[str]:
    """Problems with an all-reduce and a broadcast (none: empty)."""
    problems = []
    t = torch.full((1024,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(t)
    want = dist.get_world_size() * (dist.get_world_size() + 1) / 2
    if not torch.all(t == want):
        problems.append(f"all_reduce gave {t[0].item()}, expected {want}")
    b = torch.arange(8, dtype=torch.float32, device=device) * (dist.get_rank() == 0)
    dist.broadcast(b, src=0)
    if not torch.equal(b.cpu(), torch.arange(8, dtype=torch.float32)):
        problems.append(f"broadcast gave {b.tolist()}")
    return problems


def pair(model_name: str, device: torch.device, backend: str):
    """(DDP model, its optimizer, plain model, its optimizer) from the same weights."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(model_name).to(device))
    ddp = DDP(models[0], device_ids=[device.index] if device.type == "cuda" else None)
    opts = [samfast.SAM(m.parameters(), backend=backend, **SGD) for m in models]
    return ddp, opts[0], models[1], opts[1]


def compare(model_name, device, backend, ascent, data, steps) -> dict:
    ddp, ddp_opt, plain, plain_opt = pair(model_name, device, backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(steps):
            x, y = data[s % len(data)]
            sam_step(ddp, ddp_opt, lambda: F.cross_entropy(ddp(x), y), ascent=ascent)
            sam_step(plain, plain_opt, lambda: F.cross_entropy(plain(x), y), ascent=ascent)
    pairs = list(zip(ddp.module.parameters(), plain.parameters()))
    diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)
    close = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)
    in_flat = None
    if backend != "reference":  # DDP's averaged gradients must land in the flat buffer
        x, y = data[0]
        F.cross_entropy(ddp(x), y).backward()
        flat = ddp_opt._backend.buckets[0].grad.untyped_storage().data_ptr()
        in_flat = all(p.grad.untyped_storage().data_ptr() == flat
                      for p in ddp.module.parameters() if p.grad is not None)
        ddp_opt.zero_grad()
    copy_warnings = [str(w.message) for w in caught if "copied into it" in str(w.message)]
    return {"max_abs_diff": diff, "bitwise_equal": diff == 0.0, "close": close,
            "grads_in_flat_buffer": in_flat,
            "copy_warnings": copy_warnings, "skipped_steps": ddp_opt.skipped_steps}


def timing(model_name, device, backend, data, rounds) -> dict:
    ddp, ddp_opt, plain, plain_opt = pair(model_name, device, backend)
    fns = {"DDP": lambda x, y: sam_step(ddp, ddp_opt, lambda: F.cross_entropy(ddp(x), y)),
           "plain": lambda x, y: sam_step(plain, plain_opt,
                                          lambda: F.cross_entropy(plain(x), y))}
    for fn in fns.values():
        fn(*data[0])
    times = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(*data[r % len(data)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="SAM steps compared per case")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps with and without DDP")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        ap.error("run me under torchrun (torchrun --standalone --nproc_per_node 1 ...)")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return run(args, device)
    finally:
        dist.destroy_process_group()


def run(args, device: torch.device) -> int:
    lead = dist.get_rank() == 0
    env = environment(device)
    env.update(process_group=dist.get_backend(), world_size=dist.get_world_size(),
               nccl=nccl_version() if device.type == "cuda" else None)
    if lead:
        print(", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    problems = collectives(device)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(args.batch_size, 3, 32, 32, generator=gen).to(device),
             torch.randint(0, 10, (args.batch_size,), generator=gen).to(device))
            for _ in range(2)]
    rows, raw = [], {"collectives_problems": list(problems), "cases": {}}
    backends = samfast.available_backends(device)
    for backend in backends:
        for ascent in ("global", "local"):
            res = compare(args.model, device, backend, ascent, data, args.steps)
            raw["cases"][f"{backend}/{ascent}"] = res
            ok = res["close"] and res["grads_in_flat_buffer"] is not False \
                and not res["copy_warnings"] and res["skipped_steps"] == 0
            if not ok:
                problems.append(f"{backend}/{ascent}: {res}")
            rows.append([backend, ascent, f"{res['max_abs_diff']:.3g}",
                         "yes" if res["bitwise_equal"] else "no",
                         {None: "n/a", True: "yes", False: "NO"}[res["grads_in_flat_buffer"]],
                         "ok" if ok else "FAILED"])
    fused = [b for b in backends if b != "reference"]
    timed = fused[0] if fused else "reference"
    times = timing(args.model, device, timed, data, args.rounds)
    raw["times_s"] = times
    ddp_ms, plain_ms = (statistics.median(times[k]) * 1e3 for k in ("DDP", "plain"))
    table = markdown_table(["backend", "ascent", "max abs diff DDP vs plain", "bitwise",
                            "DDP grads in flat buffer", "check"], rows)
    text = (f"{dist.get_backend()} process group, world size {dist.get_world_size()}; "
            f"{args.model}, batch {args.batch_size}, {args.steps} SAM steps per case "
            f"(samfast.distributed.sam_step; DDP vs an unwrapped copy from the same weights).\n\n"
            f"Collectives (all_reduce, broadcast): "
            f"{'ok' if not raw['collectives_problems'] else raw['collectives_problems']}\n\n"
            f"{table}\n\nOne SAM step, median of {args.rounds} interleaved ({timed}): DDP "
            f"{ddp_ms:.2f} ms, unwrapped {plain_ms:.2f} ms ({ddp_ms / plain_ms:.3f}x).\n\n"
            f"{'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
    if lead:
        print(f"\n{text}", flush=True)
        if args.save:
            print("wrote", write_results("ddp_sanity", env, text, raw, None))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
