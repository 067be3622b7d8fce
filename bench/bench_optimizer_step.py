"""Optimizer-side cost of one SAM step (ascent + descent, gradients given; no forward/backward).

For the parameter lists of CIFAR models, side by side in one interleaved run:
  * samfast.SAM with every available backend (SGD base, momentum 0.9, nesterov, wd 5e-4),
  * LoopSAM: the per-tensor Python loop of davda54/sam (the baseline users have today),
  * ForeachSAM: the same algorithm with torch._foreach_* calls,
  * pytorch-optimizer's SAM with foreach=True, when pytorch_optimizer is importable (its
    foreach path takes fp32/fp64 only: 16-bit parameters run its per-tensor loop),
  * torch.optim.SGD(fused=True) alone: one SGD step, the floor (a SAM step moves 2.2x the
    bytes of an SGD step, see below),
  * a plain device copy of a parameter-sized buffer, for the memory bandwidth of this run,
  * a read pass (sum) over one (the norm and the finiteness check are such passes).

Effective bandwidth = bytes that must move / time, in units of one parameter-sized buffer P.
samfast's SAM step with SGD-momentum moves 11 P (samfast/backends/fused.py): norm 1 (read g),
ascent 4 (read w, g; write backup, w), finiteness check of the second gradients 1 (read g),
restore + SGD 5 (read backup, g, momentum; write w, momentum); 7 P of it are reads. An SGD
step moves 5 P (3 read), a copy 2 P, a read pass 1 P. Every SAM row is divided by the same
11 P (the baselines skip the finiteness check and move other amounts), so its GB/s ranks the
rows by time; "of copy" is that GB/s over the copy's, the fraction of this run's bandwidth.

    python bench/bench_optimizer_step.py [--models wrn16_8 resnet20] [--device cpu]
        [--dtype fp32|bf16|fp16] [--rounds 15] [--save]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samfast  # noqa: E402
from baselines import ForeachSAM, LoopSAM  # noqa: E402
from common import (environment, markdown_table, median, time_interleaved,  # noqa: E402
                    write_results)
from samfast.cifar.models import build_model  # noqa: E402

SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fresh_params(model_name: str, device: torch.device, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = [p for p in build_model(model_name).to(device, dtype).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def implementations(model_name: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> dict:
    fns = {}
    for backend in samfast.available_backends(device):
        params = fresh_params(model_name, device, dtype=dtype)
        opt = samfast.SAM(params, backend=backend, **SGD)

        def sam_step(opt=opt):
            opt.first_step()
            opt.second_step()
        fns[f"samfast[{backend}]"] = sam_step
    baselines = [("loop (davda54)", LoopSAM), ("foreach", ForeachSAM)]
    try:
        import pytorch_optimizer
        baselines.append(("pytorch-optimizer SAM (foreach=True)", functools.partial(
            pytorch_optimizer.SAM, base_optimizer=torch.optim.SGD, foreach=True)))
    except ImportError:
        print("pytorch_optimizer is not importable: its SAM is not timed", flush=True)
    for name, cls in baselines:
        base = cls(fresh_params(model_name, device, dtype=dtype), **SGD)

        def base_step(base=base):
            base.first_step()
            base.second_step()
        fns[name] = base_step
    sgd_params = fresh_params(model_name, device, dtype=dtype)
    fused = torch.optim.SGD(sgd_params, fused=True, **SGD)
    fns["SGD(fused) alone"] = fused.step
    n = sum(p.numel() for p in sgd_params)
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    fns["copy (bandwidth)"] = lambda: dst.copy_(src)
    fns["read pass (sum)"] = src.sum
    return fns


# Parameter-sized buffers each implementation must read + write (see the module docstring);
# every other row is a SAM step: 11.
MUST_MOVE = {"SGD(fused) alone": 5, "copy (bandwidth)": 2, "read pass (sum)": 1}
SAM_MUST_MOVE = 11


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["wrn16_8", "resnet20", "wrn28_10"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="parameter (and gradient) dtype")
    ap.add_argument("--save", action="store_true", help="write bench/results (or $OUT) files")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    raw, sections = {}, []
    dtype = DTYPES[args.dtype]
    for model_name in args.models:
        fns = implementations(model_name, device, dtype)
        shapes = [p.shape for p in build_model(model_name).parameters()]
        n_params, n_tensors = sum(s.numel() for s in shapes), len(shapes)
        samples = time_interleaved(fns, device, rounds=args.rounds)
        raw[model_name] = samples
        loop = median(samples["loop (davda54)"])
        floor = median(samples["SGD(fused) alone"])
        param_bytes = n_params * dtype.itemsize
        copy_gbps = MUST_MOVE["copy (bandwidth)"] * param_bytes / median(
            samples["copy (bandwidth)"]) / 1e9
        rows, summary = [], {}
        for name, s in samples.items():
            gbps = MUST_MOVE.get(name, SAM_MUST_MOVE) * param_bytes / median(s) / 1e9
            rows.append([name, median(s) * 1e3, loop / median(s), median(s) / floor, gbps,
                         f"{gbps / copy_gbps:.1%}"])
            summary[name] = {"median_ms": median(s) * 1e3, "x_loop": loop / median(s),
                             "x_sgd": median(s) / floor, "gbps": gbps,
                             "of_copy": gbps / copy_gbps}
        # (a "/" key: render_results.py reads it as a breakdown, not as a model's table)
        raw[f"{model_name}/summary"] = {"params": n_params, "tensors": n_tensors,
                                        "dtype": args.dtype, **summary}
        table = markdown_table(["implementation", "median ms", "speed-up vs loop",
                                "x SGD(fused) step", "effective GB/s", "of copy"], rows)
        title = (f"## {model_name}: {n_params / 1e6:.2f} M params in {n_tensors} tensors, "
                 f"{args.dtype}")
        sections.append(f"{title}\n\n{table}")
        print(f"\n{title}\n\n{table}", flush=True)
    if args.save:
        stem = "optimizer_step" if args.dtype == "fp32" else f"optimizer_step_{args.dtype}"
        path = write_results(stem, env, "\n\n".join(sections), raw, None)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
