"""End-to-end training-step cost of SAM vs SGD, for samfast and for the SAM people use today.

For each CIFAR model, on a fixed real-shaped batch (random pixels, batch 128 by default), the
median time of one full training step, interleaved in one run:

  * SGD: forward + backward + torch.optim.SGD step (momentum 0.9, nesterov, wd 5e-4),
  * samfast SAM with each available backend (two forward/backward passes + the fused step),
  * LoopSAM: the per-tensor loop of davda54/sam; ForeachSAM: the same with torch._foreach,

each with the second pass leaving BatchNorm statistics alone; with ``--cuda-graph`` on CUDA
also the SGD step and each fused samfast backend's whole step captured in a CUDA graph, in the
same precision (``--amp``) as the eager rows. Reported: median ms, the SAM / SGD ratio per
implementation (graphed rows over the graphed SGD step, eager rows over the eager one; two
passes: the physical floor is 2.0); the time of the
optimizer side of each step (zero_grad, ascent, update: everything but the passes), measured
inside the steps, and the ratio with the passes' time pooled over all implementations (the
passes are the same code for all; on a noisy CPU this ranks implementations by the part that
differs, which the direct ratio cannot resolve); peak memory (CUDA:
max_memory_allocated per implementation; CPU: optimizer-state bytes), and a whole-run cost
model: 200 epochs of 391 steps (50k images / 128) for SGD, full SAM and SGD -> SAM switched at
50 / 75 / 87.5 / 95 % of the epochs, from the measured step times.

    python bench/bench_train_step.py [--models resnet20 wrn16_8] [--amp bf16] [--compile]
                                     [--batch-size 128] [--cuda-graph] [--save]
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
from baselines import ForeachSAM, LoopSAM  # noqa: E402
from common import (environment, markdown_table, median, time_interleaved,  # noqa: E402
                    write_results)
from samfast.cifar.models import build_model  # noqa: E402

SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
STEPS_PER_EPOCH = 391  # ceil(50_000 / 128)
SWITCHES = (0.5, 0.75, 0.875, 0.95)


def _state_bytes(opt) -> int:
    """Bytes of optimizer-held tensors: momentum buffers, plus SAM's saved weights."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    base = getattr(opt, "base_optimizer", opt)
    for st in base.state.values():
        for v in st.values():
            add(v)
    if isinstance(opt, samfast.SAM) and hasattr(opt._backend, "buckets"):
        for b in opt._backend.buckets:
            add(b.backup)
    if isinstance(opt, LoopSAM):
        for t in getattr(opt, "old_p", {}).values():
            add(t)
        for t in getattr(opt, "old", []):
            add(t)
    return total


class Clock:
    """Time stamps inside a step, split into the passes (forward + backward, the same code for
    every implementation) and the optimizer side (zero_grad, the SAM ascent, the update)."""

    def __init__(self, device: torch.device) -> None:
        # On a GPU the stamps would need a sync each, which would stall the launch queue and
        # change what is measured; there the direct step times are precise enough.
        self.enabled = device.type != "cuda"
        self.passes: list[float] = []
        self.optimizer: list[float] = []
        self._pass = self._opt = 0.0
        self._t = 0.0

    def start(self) -> None:
        self._pass = self._opt = 0.0
        self._t = time.perf_counter()

    def lap(self, kind: str) -> None:
        if not self.enabled:
            return
        t = time.perf_counter()
        if kind == "pass":
            self._pass += t - self._t
        else:
            self._opt += t - self._t
        self._t = t

    def stop(self) -> None:
        if not self.enabled:
            return
        self.passes.append(self._pass)
        self.optimizer.append(self._opt)


def implementations(name: str, device: torch.device, x, y, amp: str, compile_model: bool):
    """name -> (step function, optimizer, clock), each on its own copy of the model."""
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" \
        else contextlib.nullcontext
    impls = {}

    def fresh():
        torch.manual_seed(0)
        model = build_model(name).to(device)
        return model, (torch.compile(model) if compile_model else model)

    def loss_of(fwd):
        with ctx():
            return F.cross_entropy(fwd(x).float(), y)

    model, fwd = fresh()
    sgd = torch.optim.SGD(model.parameters(), **SGD)

    def sgd_step(fwd=fwd, opt=sgd, clock=Clock(device)):
        clock.start()
        opt.zero_grad()
        clock.lap("opt")
        loss_of(fwd).backward()
        clock.lap("pass")
        opt.step()
        clock.lap("opt")
        clock.stop()
    impls["SGD"] = (sgd_step, sgd, sgd_step.__defaults__[-1])
    for backend in samfast.available_backends(device):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests
        model, fwd = fresh()
        opt = samfast.SAM(model.parameters(), backend=backend, **SGD)

        def sam_step(model=model, fwd=fwd, opt=opt, clock=Clock(device)):
            clock.start()
            opt.zero_grad()
            clock.lap("opt")
            loss_of(fwd).backward()
            clock.lap("pass")
            opt.first_step()
            opt.zero_grad()
            clock.lap("opt")
            with samfast.running_stats_disabled(model):
                loss_of(fwd).backward()
            clock.lap("pass")
            opt.second_step()
            clock.lap("opt")
            clock.stop()
        impls[f"samfast SAM [{backend}]"] = (sam_step, opt, sam_step.__defaults__[-1])
    for label, cls in (("loop SAM (davda54)", LoopSAM), ("foreach SAM", ForeachSAM)):
        model, fwd = fresh()
        opt = cls(model.parameters(), **SGD)

        def base_step(model=model, fwd=fwd, opt=opt, clock=Clock(device)):
            clock.start()
            for p in model.parameters():
                p.grad = None
            clock.lap("opt")
            loss_of(fwd).backward()
            clock.lap("pass")
            opt.first_step()
            for p in model.parameters():
                p.grad = None
            clock.lap("opt")
            samfast.disable_running_stats(model)
            loss_of(fwd).backward()
            samfast.enable_running_stats(model)
            clock.lap("pass")
            opt.second_step()
            clock.lap("opt")
            clock.stop()
        impls[label] = (base_step, opt, base_step.__defaults__[-1])
    return impls


def memory_table(name: str, device: torch.device) -> str:
    """Optimizer-held bytes after one step, per implementation, in parameter-sized buffers P
    (state does not depend on the batch: a batch of 8 suffices)."""
    x = torch.rand(8, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    impls = implementations(name, device, x, y, "none", False)
    n = sum(p.numel() for p in build_model(name).parameters())
    p_bytes = n * 4
    rows = []
    for k, (fn, opt, _) in impls.items():
        fn()
        state = _state_bytes(opt)
        rows.append([k, state / 2 ** 20, f"{state / p_bytes:.3f} P"])
    sgd = rows[0][1]
    for row in rows:
        row.append(f"{(row[1] - sgd) * 2 ** 20 / p_bytes:+.3f} P")
    return (f"## Optimizer state, {name} ({n / 1e6:.2f} M params, P = {p_bytes / 2 ** 20:.1f} "
            f"MiB)\n\n" + markdown_table(["implementation", "state MiB", "state", "vs SGD"],
                                          rows) +
            "\n\nHeld between steps. The reference backend clones its backup in first_step "
            "and frees it in second_step, so it peaks at +1 P during the step too.")


def cuda_graph_step(name, device, x, y, amp: str, backend: str | None):
    """One whole training step captured in a CUDA graph, in the same precision as the eager
    rows: samfast SAM with ``backend`` (two passes + the fused update) or, with ``backend``
    None, the SGD step (one pass + torch.optim.SGD) that the graphed SAM rows are divided by.
    Autocast runs with cache_enabled=False, as torch asks for graph capture (the cache would
    hold casts made during capture; within one forward each weight is cast once either way)."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    ctx = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
           if amp == "bf16" else contextlib.nullcontext)

    def loss():
        with ctx():
            return F.cross_entropy(model(x).float(), y)
    if backend is None:
        opt = torch.optim.SGD(model.parameters(), **SGD)

        def step():
            opt.zero_grad()
            loss().backward()
            opt.step()
    else:
        opt = samfast.SAM(model.parameters(), backend=backend, **SGD)

        def step():
            opt.zero_grad()
            loss().backward()
            opt.first_step()
            opt.zero_grad()
            with samfast.running_stats_disabled(model):
                loss().backward()
            opt.second_step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graphed_steps(name, device, x, y, amp: str) -> dict:
    """label -> replay of each graphable step: SGD and every fused backend on the device (the
    reference backend decides skips on the host: not capturable). A capture that fails is
    reported and left out, so the eager rows still come back."""
    fns = {}
    for backend in [None] + [b for b in samfast.available_backends(device) if b != "reference"]:
        label = "SGD, CUDA graph" if backend is None else f"samfast SAM [{backend}], CUDA graph"
        try:
            fns[label] = cuda_graph_step(name, device, x, y, amp, backend)
        except Exception as exc:  # noqa: BLE001 - one failed capture must not end the run
            print(f"{label}: capture failed: {type(exc).__name__}: {exc}", flush=True)
    return fns


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--amp", choices=("none", "bf16"), default="none")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-models", nargs="*", default=["wrn28_10"],
                    help="models for the optimizer-state table (one small-batch step each)")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    models = args.models or (["resnet20", "wrn16_8"] if device.type == "cpu" else
                             ["resnet20", "wrn16_8", "wrn28_10", "resnet18", "vgg16_bn"])
    rounds = args.rounds or (5 if device.type == "cpu" else 20)
    env = environment(device)
    print(", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    sections, raw = [], {}
    for name in models:
        x = torch.rand(args.batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        impls = implementations(name, device, x, y, args.amp, args.compile)
        fns = {k: fn for k, (fn, _, _) in impls.items()}
        if args.cuda_graph and device.type == "cuda":
            fns.update(graphed_steps(name, device, x, y, args.amp))
        peaks = {}
        if device.type == "cuda":
            for k, fn in fns.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                peaks[k] = torch.cuda.max_memory_allocated() / 2 ** 20
        samples = time_interleaved(fns, device, rounds=rounds, warmup=2, cold=False)
        raw[name] = samples
        sgd = median(samples["SGD"])
        # graphed rows are divided by the graphed SGD step, eager rows by the eager one
        sgd_of = {k: median(samples["SGD, CUDA graph"]) if k.endswith(", CUDA graph")
                  and "SGD, CUDA graph" in samples else sgd for k in samples}
        # Derived ratio: on a CPU a step's time varies by a few % from run to run, more than
        # the whole optimizer side of a step (ResNet-20: ~0.5 %), so the direct ratios cannot
        # rank implementations whose passes are the same code. Pooling the pass times of all
        # implementations and adding each one's own optimizer-side time (measured inside its
        # steps, so with the caches as training leaves them) ranks them by what differs.
        clocks = {k: c for k, (_, _, c) in impls.items() if c.passes}
        opt_side, per_pass = {}, None
        if clocks:
            # (the clocks also saw the warm-up calls: keep the timed rounds)
            per_pass = statistics.median([t / (1 if k == "SGD" else 2) for k, c in clocks.items()
                                          for t in c.passes[-rounds:]])
            opt_side = {k: median(c.optimizer[-rounds:]) for k, c in clocks.items()}
            raw[f"{name}/optimizer_side"] = {k: c.optimizer[-rounds:] for k, c in clocks.items()}
            raw[f"{name}/passes"] = {k: c.passes[-rounds:] for k, c in clocks.items()}
        rows = []
        for k, s in samples.items():
            opt = impls[k][1] if k in impls else None
            mem = (f"{peaks[k]:.0f} MiB peak" if device.type == "cuda"
                   else f"{_state_bytes(opt) / 2 ** 20:.1f} MiB state" if opt is not None else "")
            if k in opt_side:
                derived = ((per_pass * (1 if k == "SGD" else 2) + opt_side[k])
                           / (per_pass + opt_side["SGD"]))
                rows.append([k, median(s) * 1e3, median(s) / sgd_of[k], opt_side[k] * 1e3,
                             f"{derived:.4f}", mem])
            else:
                rows.append([k, median(s) * 1e3, median(s) / sgd_of[k], "", "", mem])
        table = markdown_table(["implementation", "median ms / step", "x SGD step (same mode)",
                                "optimizer side ms / step", "x SGD step (pooled passes)",
                                "memory"], rows)
        if per_pass is not None:
            table += (f"\n\nOne forward + backward pass (pooled over all implementations): "
                      f"{per_pass * 1e3:.1f} ms.")
        sam_key = min((k for k in samples if k.startswith("samfast SAM [")
                       and not k.endswith(", CUDA graph")),
                      key=lambda k: median(samples[k]))
        sam = median(samples[sam_key])
        epoch_sgd, epoch_sam = sgd * STEPS_PER_EPOCH, sam * STEPS_PER_EPOCH
        cost_rows = [["SGD", 200 * epoch_sgd / 3600, 1.0], ["full SAM", 200 * epoch_sam / 3600,
                                                           epoch_sam / epoch_sgd]]
        for f in SWITCHES:
            sam_epochs = round(200 * (1 - f))
            hours = ((200 - sam_epochs) * epoch_sgd + sam_epochs * epoch_sam) / 3600
            cost_rows.append([f"SGD -> SAM at {f:.1%} ({sam_epochs} SAM epochs)", hours,
                              hours * 3600 / (200 * epoch_sgd)])
        cost = markdown_table(["200-epoch run (391 steps/epoch)", "predicted hours",
                               "x SGD run"], cost_rows)
        n = sum(p.numel() for p in build_model(name).parameters())
        title = (f"## {name} ({n / 1e6:.2f} M params), batch {args.batch_size}, "
                 f"{'bf16 autocast' if args.amp == 'bf16' else 'fp32'}"
                 f"{', torch.compile' if args.compile else ''}")
        section = f"{title}\n\n{table}\n\nWhole-run cost model ({sam_key}):\n\n{cost}"
        sections.append(section)
        print(f"\n{section}", flush=True)
    for name in args.memory_models:
        section = memory_table(name, device)
        sections.append(section)
        print(f"\n{section}", flush=True)
    if args.save:
        stem = "train_step" + ("-bf16" if args.amp == "bf16" else "") + \
            ("-compile" if args.compile else "")
        print("wrote", write_results(stem, env, "\n\n".join(sections), raw, None))


if __name__ == "__main__":
    main()
