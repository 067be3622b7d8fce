"""Training-step cost of the gradient path: how each SAM gets its gradients, against SGD.

ResNet-20 (default), batch 128 of real CIFAR-10 training images (../shared/data/cifar10 if it
is there, else the subset embedded in samfast), fp32 (or bf16 autocast). Every variant runs
the explicit SAM step a user writes: forward + backward, ``first_step``, forward + backward
(BatchNorm statistics left alone), ``second_step``; gradients are cleared before each backward.

  * loop (davda54), set_to_none=True: the per-tensor loop of davda54/sam (bench/baselines.py)
    with ``zero_grad(set_to_none=True)``: every backward allocates fresh gradients,
  * loop (davda54), set_to_none=False: the same loop keeping zeroed gradients (each backward
    accumulates into them),
  * samfast [native] and samfast [reference]: ``samfast.SAM`` with ``zero_grad()`` (torch's
    contract: None until a backward reaches the param; the fused backend copies each fresh
    gradient into its flat buffer from a post-accumulate-grad hook),
  * SGD, two passes: two forward + backward and one torch.optim.SGD step, the per-round
    denominator (the same passes, an optimizer that costs almost nothing).

All variants share the SGD settings (lr 0.05, momentum 0.9, nesterov, weight decay 5e-4), start
from the same weights and see the same batch in a round. Each round times every variant once,
in an order rotated from round to round, and divides each time by that round's SGD time, so a
slow spell of a shared machine cancels. Reported per variant: the median ratio over rounds with
its 95% confidence interval (order statistics, bench/common.py), the median ms, and the median
ratio to the set_to_none=True loop.

    python bench/bench_grad_path.py [--model resnet20] [--batch-size 128] [--rounds 40]
                                    [--amp none|bf16] [--data-dir DIR] [--device cuda] [--save]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samfast  # noqa: E402
from baselines import LoopSAM  # noqa: E402
from common import (environment, markdown_table, median_interval,  # noqa: E402
                    write_results)
from samfast.cifar.data import load_cifar  # noqa: E402
from samfast.cifar.demo import DEMO_DATA  # noqa: E402
from samfast.cifar.models import build_model  # noqa: E402

SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
BASELINE = "SGD, two passes"
LOOP = "loop (davda54), set_to_none=True"


def default_data_dir() -> Path:
    return SHARED_DATA if (SHARED_DATA / "test.npz").exists() else DEMO_DATA


def batches(data_dir: Path, batch_size: int, count: int, device: torch.device):
    """``count`` distinct batches of training images (x float in [0, 1]), on the device."""
    train, _ = load_cifar(str(data_dir))
    need = batch_size * count
    if len(train) < batch_size:
        raise SystemExit(f"{data_dir}: {len(train)} training images, fewer than a batch")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:need]
    x = train.x[idx].float().div_(255).to(device)
    y = train.y[idx].to(device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(idx), batch_size)
            if i + batch_size <= len(idx)]


def variants(model_name: str, device: torch.device, amp: str) -> dict:
    """name -> step(x, y), each on its own copy of the same initial model."""
    ctx = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16"
           else contextlib.nullcontext)

    def fresh():
        torch.manual_seed(0)
        return build_model(model_name).to(device)

    def loss_of(model, x, y):
        with ctx():
            return F.cross_entropy(model(x).float(), y)

    steps = {}
    for set_to_none in (True, False):
        model = fresh()
        opt = LoopSAM(model.parameters(), **SGD)

        def loop_step(x, y, model=model, opt=opt, set_to_none=set_to_none):
            opt.base_optimizer.zero_grad(set_to_none=set_to_none)
            loss_of(model, x, y).backward()
            opt.first_step()
            opt.base_optimizer.zero_grad(set_to_none=set_to_none)
            with samfast.running_stats_disabled(model):
                loss_of(model, x, y).backward()
            opt.second_step()
        steps[f"loop (davda54), set_to_none={set_to_none}"] = loop_step
    for backend in ("native", "reference"):
        if backend not in samfast.available_backends(device):
            print(f"samfast [{backend}]: not available on {device}, left out", flush=True)
            continue
        model = fresh()
        opt = samfast.SAM(model.parameters(), backend=backend, **SGD)

        def sam_step(x, y, model=model, opt=opt):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.first_step()
            opt.zero_grad()
            with samfast.running_stats_disabled(model):
                loss_of(model, x, y).backward()
            opt.second_step()
        steps[f"samfast [{backend}]"] = sam_step
    model = fresh()
    sgd = torch.optim.SGD(model.parameters(), **SGD)

    def sgd_step(x, y, model=model, opt=sgd):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.zero_grad()
        with samfast.running_stats_disabled(model):
            loss_of(model, x, y).backward()
        opt.step()
    steps[BASELINE] = sgd_step
    return steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(steps: dict, data: list, device: torch.device, rounds: int,
               warmup: int) -> tuple[dict, list]:
    """Seconds per step of every variant, one sample per round, and each round's order."""
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](*data[i % len(data)])
    sync(device)
    seconds = {name: [] for name in names}
    orders = []
    for r in range(rounds):
        x, y = data[r % len(data)]
        order = names[r % len(names):] + names[:r % len(names)]
        orders.append(order)
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            steps[name](x, y)
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
    return seconds, orders


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="train_*.npz + test.npz (default: ../shared/data/cifar10 if present, "
                         "else the embedded subset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--save", action="store_true",
                    help="write grad_path-<device>-<date>.{md,json} to bench/results (or $OUT)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1 or args.warmup < 0:
        ap.error("--rounds and --batch-size must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    data_dir = args.data_dir or default_data_dir()
    env = environment(device)
    print(", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    data = batches(data_dir, args.batch_size, min(8, args.rounds), device)
    steps = variants(args.model, device, args.amp)
    seconds, orders = run_rounds(steps, data, device, args.rounds, args.warmup)
    sgd = seconds[BASELINE]
    rows, summary = [], {}
    for name, s in seconds.items():
        ratios = [t / b for t, b in zip(s, sgd)]
        to_loop = [t / b for t, b in zip(s, seconds[LOOP])]
        low, high, coverage = median_interval(ratios)
        summary[name] = {"median_ratio_to_sgd": statistics.median(ratios),
                         "interval": [low, high], "coverage": coverage,
                         "median_ms": statistics.median(s) * 1e3,
                         "median_ratio_to_loop": statistics.median(to_loop)}
        rows.append([name, statistics.median(s) * 1e3, statistics.median(ratios),
                     f"{low:.3f} - {high:.3f}", statistics.median(to_loop)])
    coverage = median_interval(sgd)[2]
    n_params = sum(p.numel() for p in build_model(args.model).parameters())
    title = (f"## {args.model} ({n_params / 1e6:.2f} M params), batch {args.batch_size}, "
             f"{'bf16 autocast' if args.amp == 'bf16' else 'fp32'}, {args.rounds} rounds")
    table = markdown_table(["variant", "median ms / step", "x SGD two passes (median)",
                            f"{coverage:.0%} interval", "x loop set_to_none=True"], rows)
    text = (f"{title}\n\nImages: {data_dir.name} ({len(data)} batches, one per round in "
            f"turn). Ratios are per round (each variant over that round's SGD step), then the "
            f"median over rounds; the interval is the median's confidence interval from order "
            f"statistics, covering {coverage:.1%} with {args.rounds} rounds.\n\n{table}")
    print(f"\n{text}", flush=True)
    if args.save:
        raw = {"seconds": seconds, "orders": orders, "summary": summary,
               "settings": {**vars(args), "data_dir": str(data_dir), "device": str(device)}}
        print("wrote", write_results("grad_path", env, text, raw, None))


if __name__ == "__main__":
    main()
