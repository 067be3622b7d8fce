"""samfast-reproduce: the experiments of Zhou et al. (ICLR 2025), one command each.

    samfast-reproduce late_switch --scale small --data-dir ../shared/data/cifar10

Experiments: ``late_switch`` (Figure 1: SGD vs full SAM vs SGD -> SAM late), ``switch_sweep``
(the switch epoch swept), ``early_sam`` (SAM -> SGD), ``variants`` (ASAM and unnormalized SAM
as the late phase), ``adversarial`` (standard vs full PGD-AT vs late AT). Scales: ``smoke``
(seconds, the embedded demo data, used by tests), ``small`` (this 2-core CPU, real CIFAR-10
subset), ``full`` (the paper's settings as far as they are public; a GPU, or several with
``--torchrun N``).

Every run is a ``samfast-train`` run in ``OUT/EXPERIMENT/RUN/seedK``; finished runs (with a
``summary.json``) are skipped, so an interrupted grid resumes where it stopped. The results
are a markdown table (mean +- std over seeds) and figures. Every setting and its source is in
:data:`SETTINGS`, written next to the results as ``settings.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

# Each value: (value, source). "paper" = Zhou et al. 2025 text; "code" = the released code
# (zzp1012/SAM-in-Late-Phase) defaults as described in the issue; "choice" = ours, where the
# sources leave it open.
SETTINGS = {
    "full": {
        "model": ("wrn16_8", "paper, Figure 1 (WideResNet-16-8 on CIFAR-10)"),
        "epochs": (200, "paper, Figure 1"),
        "late_switch_epoch": (175, "paper, Figure 1 (SAM for the last 25 epochs)"),
        "batch_size": (128, "code default"),
        "lr": (0.1, "choice: the standard WRN recipe; the sources leave it open"),
        "momentum": (0.9, "code default"),
        "weight_decay": (5e-4, "code: 5e-4 for the standard WRN recipe (1e-4 otherwise)"),
        "label_smoothing": (0.1, "code default"),
        "lr_schedule": ("step_wrn", "code: WRN step schedule x0.2 at 30/60/80%"),
        "cutout": (16, "code: cutout for WRN; size 16 is the usual CIFAR-10 choice (choice)"),
        "rho": (0.05, "code default for SAM"),
        "rho_asam": (2.0, "code default (davda54-style ASAM)"),
        "rho_usam": (0.05, "choice: the sources leave it open"),
        "sharpness": ("top-2 Hessian eigenvalues on the first 5,000 training images",
                      "code; we use a fixed stratified 5,000"),
        "seeds": (5, "paper, Figure 1 (five seeds)"),
        "adversarial": ("PGD-10 L-inf 8/255, step 2/255, eval PGD-20", "choice: the standard "
                        "CIFAR-10 AT recipe (Madry et al.)"),
    },
    "small": {
        "model": ("small_cnn", "choice: trains on this CPU"),
        "train_subset": (10000, "choice"), "epochs": (20, "choice"),
        "late_switch_epoch": (15, "choice: SAM for the last 25%"),
        "batch_size": (128, "code default"), "lr": (0.05, "choice"),
        "lr_schedule": ("cosine", "choice: short runs"), "seeds": (2, "choice"),
    },
    "smoke": {
        "model": ("small_cnn", "choice"), "train_subset": (200, "choice"),
        "epochs": (2, "choice"), "late_switch_epoch": (1, "choice"), "seeds": (1, "choice"),
    },
}
EXPERIMENTS = ("late_switch", "switch_sweep", "early_sam", "variants", "adversarial")


def _value(scale: str, key: str, default=None):
    return SETTINGS[scale].get(key, (default, None))[0]


def base_args(scale: str, data_dir: str | None) -> list[str]:
    s = SETTINGS[scale]
    args = ["--model", s["model"][0], "--epochs", str(s["epochs"][0]),
            "--batch-size", str(_value(scale, "batch_size", 128)), "--quiet"]
    if scale == "full":
        args += ["--lr", "0.1", "--momentum", "0.9", "--weight-decay", "5e-4",
                 "--label-smoothing", "0.1", "--lr-schedule", "step_wrn", "--cutout", "16",
                 "--sharpness-every", str(s["epochs"][0]), "--sharpness-samples", "5000",
                 "--sharpness-k", "2", "--sharpness-iters", "40"]
    elif scale == "small":
        args += ["--lr", "0.05", "--lr-schedule", "cosine", "--train-subset", "10000",
                 "--test-subset", "2000", "--sharpness-every", str(s["epochs"][0]),
                 "--sharpness-samples", "1024", "--sharpness-k", "2", "--sharpness-iters", "20"]
    else:
        args += ["--train-subset", "200", "--test-subset", "100", "--batch-size", "50",
                 "--sharpness-every", str(s["epochs"][0]), "--sharpness-samples", "50",
                 "--sharpness-iters", "4"]
    if data_dir:
        args += ["--data-dir", data_dir]
    return args


def runs_of(experiment: str, scale: str) -> dict[str, list[str]]:
    """Run name -> extra trainer flags."""
    epochs = SETTINGS[scale]["epochs"][0]
    late = SETTINGS[scale]["late_switch_epoch"][0]
    rho_asam = "2.0"
    if experiment == "late_switch":
        return {"SGD": ["--optimizer", "sgd"], "SAM": ["--optimizer", "sam"],
                f"SGD->SAM@{late}": ["--optimizer", "sam", "--sam-start", str(late)]}
    if experiment == "switch_sweep":
        starts = sorted({0, epochs // 4, epochs // 2, (3 * epochs) // 4, late, epochs})
        return {f"SGD->SAM@{t}": ["--optimizer", "sam", "--sam-start", str(t)] for t in starts}
    if experiment == "early_sam":
        ends = sorted({max(1, epochs // 8), max(1, epochs // 4), max(1, epochs // 2)})
        return {"SGD": ["--optimizer", "sgd"], "SAM": ["--optimizer", "sam"],
                **{f"SAM->SGD@{t}": ["--optimizer", "sam", "--sam-end", str(t)] for t in ends}}
    if experiment == "variants":
        return {f"{name}{tag}": ["--optimizer", name.lower()] + rho + start
                for name, rho in (("ASAM", ["--rho", rho_asam]), ("USAM", ["--rho", "0.05"]))
                for tag, start in (("", []), (f"@{late}", ["--sam-start", str(late)]))}
    if experiment == "adversarial":
        common = ["--optimizer", "sgd", "--eval-robust-every", str(epochs),
                  "--adv-steps", "10" if scale != "smoke" else "2",
                  "--eval-pgd-steps", "20" if scale != "smoke" else "3",
                  "--eval-robust-samples", "500" if scale != "smoke" else "20"]
        return {"standard": common, "full AT": common + ["--adv-start", "0"],
                f"AT@{late}": common + ["--adv-start", str(late)]}
    raise ValueError(f"Invalid experiment: {experiment!r} (choose from {', '.join(EXPERIMENTS)})")


def _run_one(argv: list[str], torchrun: int, device: str | None) -> None:
    if device:
        argv = argv + ["--device", device]
    if torchrun > 1:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(torchrun), "-m", "samfast.cifar.train", *argv],
                       check=True)
    else:
        from samfast.cifar import train as trainer
        trainer.run(trainer.parse_config(argv))


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(root: Path, runs: dict, seeds: int) -> str:
    rows = ["| run | SAM epochs | AT epochs | test error % | test loss | sharpness | robust acc % "
            "| wall time s |", "|---|---|---|---|---|---|---|---|"]
    for name in runs:
        sums = [json.loads((root / _slug(name) / f"seed{k}" / "summary.json").read_text())
                for k in range(seeds)]
        rows.append("| " + " | ".join([
            name, str(sums[0]["sam_epochs"]), str(sums[0].get("adversarial_epochs", 0)),
            _mean_std([100 - s["test_acc"] for s in sums]),
            _mean_std([s["test_loss"] for s in sums]),
            _mean_std([s.get("sharpness") for s in sums]),
            _mean_std([s.get("robust_acc") for s in sums]),
            _mean_std([s["wall_time_s"] for s in sums])]) + " |")
    return "\n".join(rows)


def plot(root: Path, runs: dict, seeds: int, experiment: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in runs:
        rows = [json.loads(line) for line in
                (root / _slug(name) / "seed0" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if r["test_acc"] is not None]
        axes[0].plot([r["epoch"] + 1 for r in evals], [100 - r["test_acc"] for r in evals],
                     label=name)
        sharp = [r for r in rows if r.get("sharpness") is not None]
        if sharp:
            axes[1].scatter([r["epoch"] + 1 for r in sharp], [r["sharpness"] for r in sharp],
                            label=name)
    axes[0].set(xlabel="epoch", ylabel="test error (%)", title=f"{experiment}: test error (seed 0)")
    axes[1].set(xlabel="epoch", ylabel="top Hessian eigenvalue", title="sharpness")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "figure.png", dpi=110)
    plt.close(fig)


# Trainer options that do not change what a run computes.
_NOT_IN_KEY = ("out", "resume", "quiet")


def _config_key(argv: list[str]) -> str:
    """The run's full trainer configuration (defaults filled in) as canonical JSON: two runs
    with equal keys are the same computation (e.g. ``SGD->SAM@0`` of the sweep and ``SAM``)."""
    from samfast.cifar import train as trainer
    cfg = trainer.parse_config(argv)
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k not in _NOT_IN_KEY},
                      default=str)


def _finished_runs(scale_root: Path) -> dict[str, Path]:
    """config key -> run directory, for every finished run of every experiment of a scale."""
    found = {}
    for key_file in sorted(scale_root.glob("*/*/seed*/config_key.json")):
        if (key_file.parent / "summary.json").exists():
            found.setdefault(key_file.read_text(), key_file.parent)
    return found


# Cost of one epoch relative to an SGD epoch, measured on the development CPU (see README):
# a SAM epoch is two forward/backward passes (bench/bench_epoch_cost.py: 2.00); a PGD-10
# adversarial-training epoch with its attack (bench/bench_adv_switch.py: full AT 121.4 s vs
# standard 17.2 s over the same 10 epochs: 7.1).
EPOCH_COST = {"sgd": 1.0, "sam": 2.0, "adversarial": 7.1}


def estimate(scale: str, experiments=EXPERIMENTS, sgd_epoch_s: float | None = None) -> str:
    """The grid's cost in SGD-epoch equivalents (and hours, given one SGD epoch's seconds on
    the target machine), per experiment and for all of them with shared runs counted once."""
    from samfast.cifar import train as trainer
    seeds = SETTINGS[scale]["seeds"][0]
    rows = ["| experiment | runs x seeds | SAM epochs | AT epochs | SGD-epoch equivalents | "
            "hours |", "|---|---|---|---|---|---|"]
    seen: dict[str, float] = {}
    for experiment in experiments:
        cost, sam, adv, runs = 0.0, 0, 0, runs_of(experiment, scale)
        for flags in runs.values():
            argv = base_args(scale, None) + flags
            cfg = trainer.parse_config(argv)
            sched = trainer.make_schedule(cfg)
            epochs = cfg["epochs"]
            n_sam, n_adv = sched.sam_epochs, sched.adversarial_epochs
            c = (epochs - n_sam - n_adv + (n_sam * EPOCH_COST["sam"])
                 + n_adv * EPOCH_COST["adversarial"])
            cost += c * seeds
            sam += n_sam * seeds
            adv += n_adv * seeds
            seen[_config_key(argv)] = c * seeds
        hours = f"{cost * sgd_epoch_s / 3600:.1f}" if sgd_epoch_s else "-"
        rows.append(f"| {experiment} | {len(runs)} x {seeds} | {sam} | {adv} | {cost:.0f} | "
                    f"{hours} |")
    total = sum(seen.values())
    hours = f"{total * sgd_epoch_s / 3600:.1f}" if sgd_epoch_s else "-"
    rows.append(f"| all, shared runs once | {len(seen)} x {seeds} | | | {total:.0f} | {hours} |")
    return "\n".join(rows)


def plot_vs_switch(root: Path, runs: dict, seeds: int, experiment: str) -> None:
    """Final test error and sharpness against the switch epoch (mean and std over seeds):
    ``switch_sweep`` (SGD -> SAM at epoch t) and ``early_sam`` (SAM -> SGD at epoch t)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "sam_start" if experiment == "switch_sweep" else "sam_end"
    points = []
    for name in runs:
        sums = [json.loads((root / _slug(name) / f"seed{k}" / "summary.json").read_text())
                for k in range(seeds)]
        cfg = sums[0]["config"]
        t = cfg[key] if cfg["optimizer"] != "sgd" else None
        if t is None:
            continue  # the plain SGD / SAM references of early_sam have no switch epoch
        err = [100 - s["test_acc"] for s in sums]
        sharp = [s["sharpness"] for s in sums if s.get("sharpness") is not None]
        points.append((t, err, sharp))
    points.sort()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, index, label in ((axes[0], 1, "test error (%)"), (axes[1], 2, "top Hessian eigenvalue")):
        xs = [p[0] for p in points if p[index]]
        means = [statistics.mean(p[index]) for p in points if p[index]]
        stds = [statistics.stdev(p[index]) if len(p[index]) > 1 else 0.0
                for p in points if p[index]]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3)
        what = "SGD -> SAM at epoch" if experiment == "switch_sweep" else "SAM -> SGD at epoch"
        ax.set(xlabel=what, ylabel=label, title=f"{experiment}: {label} ({seeds} seeds)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "vs_switch.png", dpi=110)
    plt.close(fig)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="samfast-reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=EXPERIMENTS)
    ap.add_argument("--scale", choices=tuple(SETTINGS), default="small")
    ap.add_argument("--data-dir", default=None,
                    help="CIFAR-10 (smoke scale: the embedded demo subset by default)")
    ap.add_argument("--out", default="runs/reproduce")
    ap.add_argument("--seeds", type=int, default=None, help="default: the scale's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--torchrun", type=int, default=1, help="processes per run (GPUs)")
    ap.add_argument("--estimate", action="store_true",
                    help="print the grid's cost (all experiments) and exit without training")
    ap.add_argument("--sgd-epoch-seconds", type=float, default=None,
                    help="with --estimate: one SGD epoch's seconds on the target machine")
    args = ap.parse_args(argv)
    if args.estimate:
        print(estimate(args.scale, sgd_epoch_s=args.sgd_epoch_seconds))
        return 0
    data_dir = args.data_dir
    if data_dir is None and args.scale == "smoke":
        from samfast.cifar.demo import DEMO_DATA
        data_dir = str(DEMO_DATA)
    seeds = args.seeds or SETTINGS[args.scale]["seeds"][0]
    root = Path(args.out) / args.scale / args.experiment
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(
        {k: {"value": v, "source": src} for k, (v, src) in SETTINGS[args.scale].items()},
        indent=1))
    runs = runs_of(args.experiment, args.scale)
    finished = _finished_runs(root.parent)
    for name, flags in runs.items():
        for seed in range(seeds):
            out = root / _slug(name) / f"seed{seed}"
            argv = base_args(args.scale, data_dir) + flags + ["--seed", str(seed)]
            key = _config_key(argv + (["--device", args.device] if args.device else []))
            if (out / "summary.json").exists():
                print(f"skip {name} seed {seed}: done", file=sys.stderr)
            elif key in finished:
                # The same training run (same configuration) finished in another experiment
                # of this scale: copy it rather than train it again.
                print(f"copy {name} seed {seed}: same run as {finished[key]}", file=sys.stderr)
                if out.exists():
                    shutil.rmtree(out)
                shutil.copytree(finished[key], out)
            else:
                print(f"run  {name} seed {seed}", file=sys.stderr, flush=True)
                _run_one(argv + ["--out", str(out), "--resume"], args.torchrun, args.device)
            (out / "config_key.json").write_text(key)
            finished.setdefault(key, out)
    table = summarize(root, runs, seeds)
    (root / "results.md").write_text(f"# {args.experiment} ({args.scale}, {seeds} seeds)\n\n"
                                     f"{table}\n")
    plot(root, runs, seeds, args.experiment)
    if args.experiment in ("switch_sweep", "early_sam"):
        plot_vs_switch(root, runs, seeds, args.experiment)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
