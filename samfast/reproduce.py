"""samfast-reproduce: the experiments of Zhou et al. (ICLR 2025), one command each.

    samfast-reproduce late_switch --scale small --data-dir ../shared/data/cifar10

Experiments: ``late_switch`` (Figure 1: SGD vs full SAM vs SGD -> SAM late), ``switch_sweep``
(the switch epoch swept), ``early_sam`` (SAM -> SGD), ``variants`` (ASAM and unnormalized SAM
as the late phase), ``adversarial`` (standard vs full PGD-AT vs late AT). Scales: ``smoke``
(seconds, the embedded demo data, used by tests), ``small`` (this 2-core CPU, real CIFAR-10
subset), ``full`` (the paper's settings as far as they are public; a GPU, or several with
``--torchrun N``).

Every run is a ``samfast-train`` run in ``OUT/SCALE/EXPERIMENT/RUN/seedK``, identified by its
full configuration (samfast.cifar.config.run_identity: every trainer setting that affects the
result, the fingerprint of the data it used, its number of processes), which its
``summary.json`` and checkpoint record. Before any training, each run directory is checked: a
finished run of the same configuration is skipped, an interrupted one resumed, and the same
run finished in another experiment of the scale is copied; a directory holding a run of
another configuration (other data, other settings) is an error that lists the differences,
so a grid is never rerun over, mixed with or reported from runs of other settings: give
another ``--out``, or remove them. The results are a markdown table (mean +- std over seeds)
and figures. Every setting, trainer and grid, with its source is written next to the results
as ``settings.json``; :data:`SETTINGS` holds those the scales choose.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from samfast.cifar import config

# Each value: (value, source). "paper" = Zhou et al. 2025 text; "code" = the released code
# (zzp1012/SAM-in-Late-Phase) defaults as described in the issue; "choice" = ours, where the
# sources leave it open. Keys that name a samfast-train setting (RunConfig field) are passed to
# every run of the scale; the others (GRID_KEYS) shape the grid.
_RHO = {
    "rho": (0.05, "code default for SAM"),
    "rho_asam": (2.0, "code default (davda54-style ASAM)"),
    "rho_usam": (0.05, "choice: the sources leave it open"),
}
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
        **_RHO,
        "sharpness_every": (200, "choice: at the end of training"),
        "sharpness_samples": (5000, "code: the first 5,000 training images; we use a fixed "
                                    "stratified 5,000"),
        "sharpness_k": (2, "code: top-2 Hessian eigenvalues"),
        "sharpness_iters": (40, "choice"),
        "adv_steps": (10, "choice: the standard CIFAR-10 AT recipe (Madry et al.), PGD-10"),
        "eval_pgd_steps": (20, "choice: PGD-20 evaluation, as usual for CIFAR-10"),
        "eval_robust_samples": (500, "choice"),
        "seeds": (5, "paper, Figure 1 (five seeds)"),
    },
    "small": {
        "model": ("small_cnn", "choice: trains on this CPU"),
        "train_subset": (10000, "choice"), "test_subset": (2000, "choice"),
        "epochs": (20, "choice"), "late_switch_epoch": (15, "choice: SAM for the last 25%"),
        "batch_size": (128, "code default"), "lr": (0.05, "choice"),
        "lr_schedule": ("cosine", "choice: short runs"), **_RHO,
        "sharpness_every": (20, "choice: at the end of training"),
        "sharpness_samples": (1024, "choice"), "sharpness_k": (2, "code: top-2"),
        "sharpness_iters": (20, "choice"),
        "adv_steps": (10, "choice: PGD-10 (Madry et al.)"),
        "eval_pgd_steps": (20, "choice: PGD-20"), "eval_robust_samples": (500, "choice"),
        "seeds": (2, "choice"),
    },
    "smoke": {
        "model": ("small_cnn", "choice"), "train_subset": (200, "choice"),
        "test_subset": (100, "choice"), "batch_size": (50, "choice"),
        "epochs": (2, "choice"), "late_switch_epoch": (1, "choice"), **_RHO,
        "sharpness_every": (2, "choice: at the end"), "sharpness_samples": (50, "choice"),
        "sharpness_iters": (4, "choice"), "adv_steps": (2, "choice"),
        "eval_pgd_steps": (3, "choice"), "eval_robust_samples": (20, "choice"),
        "seeds": (1, "choice"),
    },
}
GRID_KEYS = ("late_switch_epoch", "rho_asam", "rho_usam", "seeds")
EXPERIMENTS = ("late_switch", "switch_sweep", "early_sam", "variants", "adversarial")


def _value(scale: str, key: str):
    return SETTINGS[scale][key][0]


def base_args(scale: str, data_dir: str | None) -> list[str]:
    """The samfast-train flags every run of the scale shares."""
    trainer_settings = {k: v for k, (v, _) in SETTINGS[scale].items() if k not in GRID_KEYS}
    args = config.to_argv(trainer_settings) + ["--quiet"]
    if data_dir:
        args += ["--data-dir", data_dir]
    return args


def settings_record(scale: str, data_dir: str | None) -> dict[str, dict]:
    """settings.json: every trainer setting that affects the result (as a run of the scale
    gets it) and every grid setting, each with its value and source."""
    cfg = config.config_from_flags(base_args(scale, data_dir)).record()
    chosen = SETTINGS[scale]
    record = {}
    for f in fields(config.RunConfig):
        if config.affects(f.name) is config.Affects.NOTHING:
            continue
        source = (chosen[f.name][1] if f.name in chosen
                  else config.source(f.name) or "samfast-train default")
        record[f.name] = {"value": cfg[f.name], "source": source}
    for key in GRID_KEYS:
        record[key] = {"value": chosen[key][0], "source": chosen[key][1]}
    return record


def runs_of(experiment: str, scale: str) -> dict[str, list[str]]:
    """Run name -> extra trainer flags."""
    epochs = _value(scale, "epochs")
    late = _value(scale, "late_switch_epoch")
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
                for name, rho in (("ASAM", ["--rho", str(_value(scale, "rho_asam"))]),
                                  ("USAM", ["--rho", str(_value(scale, "rho_usam"))]))
                for tag, start in (("", []), (f"@{late}", ["--sam-start", str(late)]))}
    if experiment == "adversarial":
        common = ["--optimizer", "sgd", "--eval-robust-every", str(epochs)]
        return {"standard": common, "full AT": common + ["--adv-start", "0"],
                f"AT@{late}": common + ["--adv-start", str(late)]}
    raise ValueError(f"Invalid experiment: {experiment!r} (choose from {', '.join(EXPERIMENTS)})")


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
        if ax.get_legend_handles_labels()[0]:  # no sharpness measured: an empty panel
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "figure.png", dpi=110)
    plt.close(fig)


# Cost of one epoch relative to an SGD epoch, measured on the development CPU (see README):
# a SAM epoch is two forward/backward passes (bench/bench_epoch_cost.py: 2.00); a PGD-10
# adversarial-training epoch with its attack (bench/bench_adv_switch.py: full AT 121.4 s vs
# standard 17.2 s over the same 10 epochs: 7.1).
EPOCH_COST = {"sgd": 1.0, "sam": 2.0, "adversarial": 7.1}


def estimate(scale: str, experiments=EXPERIMENTS, sgd_epoch_s: float | None = None) -> str:
    """The grid's cost in SGD-epoch equivalents (and hours, given one SGD epoch's seconds on
    the target machine), per experiment and for all of them with shared runs counted once."""
    seeds = _value(scale, "seeds")
    rows = ["| experiment | runs x seeds | SAM epochs | AT epochs | SGD-epoch equivalents | "
            "hours |", "|---|---|---|---|---|---|"]
    seen: dict[str, float] = {}
    for experiment in experiments:
        cost, sam, adv, runs = 0.0, 0, 0, runs_of(experiment, scale)
        for flags in runs.values():
            argv = base_args(scale, None) + flags
            cfg = config.config_from_flags(argv)
            sched = cfg.schedule()
            epochs = cfg.epochs
            n_sam, n_adv = sched.sam_epochs, sched.adversarial_epochs
            c = (epochs - n_sam - n_adv + (n_sam * EPOCH_COST["sam"])
                 + n_adv * EPOCH_COST["adversarial"])
            cost += c * seeds
            sam += n_sam * seeds
            adv += n_adv * seeds
            seen[config.run_key(config.run_identity(cfg, None, 1))] = c * seeds
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


def _run_one(argv: list[str], torchrun: int) -> None:
    if torchrun > 1:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(torchrun), "-m", "samfast.cifar.train", *argv],
                       check=True)
    else:
        from samfast.cifar import train as trainer
        trainer.run(trainer.parse_config(argv))


class _Fingerprints:
    """The fingerprint of the data each run would use (the trainer's), loading each data
    directory once: a bad one is reported before any training."""

    def __init__(self) -> None:
        self._loaded: dict = {}
        self._digests: dict = {}

    def __call__(self, cfg: config.RunConfig) -> dict:
        from samfast.cifar import train as trainer
        from samfast.cifar.data import find_data_dir, load_cifar
        where = (find_data_dir(cfg.data_dir), cfg.dataset)
        subset = (where, cfg.train_subset, cfg.test_subset, cfg.seed)
        if subset not in self._digests:
            if where not in self._loaded:
                self._loaded[where] = load_cifar(*where)
            used = trainer.select_data(cfg, *self._loaded[where])
            self._digests[subset] = trainer.data_fingerprint(*used)
        return self._digests[subset]


def _recorded(out: Path):
    """(status, config, identity) of the run directory ``out``: "finished" (summary.json),
    "interrupted" (last.pt only) or "new" (neither; config and identity None)."""
    from samfast.cifar import train as trainer
    summary, ckpt = out / "summary.json", out / "last.pt"
    if summary.exists():
        try:
            record = json.loads(summary.read_text())
        except (OSError, ValueError) as exc:
            raise trainer.RunError(f"{summary}: not a readable samfast-train summary "
                                   f"({type(exc).__name__}: {exc})") from exc
        return ("finished", *trainer.recorded_identity(record, summary))
    if ckpt.exists():
        return ("interrupted", *trainer.recorded_identity(trainer.read_checkpoint(ckpt), ckpt))
    return "new", None, None


def _finished_elsewhere(scale_root: Path) -> dict[str, Path]:
    """run key -> directory, for every finished run of every experiment of a scale."""
    from samfast.cifar import train as trainer
    found = {}
    for summary in sorted(scale_root.glob("*/*/seed*/summary.json")):
        try:
            _, identity = trainer.recorded_identity(json.loads(summary.read_text()), summary)
        except (OSError, ValueError, trainer.RunError):
            continue  # not a run this grid can reuse
        found.setdefault(config.run_key(identity), summary.parent)
    return found


def reproduce(args, data_dir: str | None, seeds: int) -> str:
    """Plan every run, check every run directory, then train what is missing; the table."""
    root = Path(args.out) / args.scale / args.experiment
    runs = runs_of(args.experiment, args.scale)
    extra = ["--device", args.device] if args.device else []
    fingerprint = _Fingerprints()
    plan, conflicts = [], []
    for name, flags in runs.items():
        for seed in range(seeds):
            out = root / _slug(name) / f"seed{seed}"
            argv = base_args(args.scale, data_dir) + flags + ["--seed", str(seed)] + extra
            cfg = config.config_from_flags(argv)
            identity = config.run_identity(cfg, fingerprint(cfg), args.torchrun)
            status, old_cfg, old = _recorded(out)
            if old is not None and old != identity:
                conflicts.append(f"{out}: " + "; ".join(
                    config.identity_changes(old, identity, old_cfg, cfg)))
            plan.append((name, seed, out, argv, config.run_key(identity), status))
    if conflicts:
        from samfast.cifar.train import RunError
        raise RunError(f"{len(conflicts)} run director{'y' if len(conflicts) == 1 else 'ies'} "
                       f"under {root} hold runs of another configuration (give another --out, "
                       f"or remove them); {conflicts[0]}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings_record(args.scale, data_dir),
                                                   indent=1))
    finished = _finished_elsewhere(root.parent)
    for name, seed, out, argv, key, status in plan:
        if status == "finished":
            print(f"skip {name} seed {seed}: done", file=sys.stderr)
        elif key in finished and finished[key] != out:
            # The same run finished in another experiment of this scale: copy it rather than
            # train it again (out holds at most an interrupted run of the same configuration).
            print(f"copy {name} seed {seed}: same run as {finished[key]}", file=sys.stderr)
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(finished[key], out)
        else:
            print(f"run  {name} seed {seed}", file=sys.stderr, flush=True)
            _run_one(argv + ["--out", str(out), "--resume"], args.torchrun)
            finished.setdefault(key, out)
    table = summarize(root, runs, seeds)
    (root / "results.md").write_text(f"# {args.experiment} ({args.scale}, {seeds} seeds)\n\n"
                                     f"{table}\n")
    plot(root, runs, seeds, args.experiment)
    if args.experiment in ("switch_sweep", "early_sam"):
        plot_vs_switch(root, runs, seeds, args.experiment)
    return table


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
    for flag, value in (("--seeds", args.seeds), ("--torchrun", args.torchrun)):
        if value is not None and value < 1:
            ap.error(f"argument {flag}: must be >= 1, got {value}")
    if args.sgd_epoch_seconds is not None and not (math.isfinite(args.sgd_epoch_seconds)
                                                   and args.sgd_epoch_seconds > 0):
        ap.error(f"argument --sgd-epoch-seconds: must be a number > 0, got "
                 f"{args.sgd_epoch_seconds}")
    if args.estimate:
        print(estimate(args.scale, sgd_epoch_s=args.sgd_epoch_seconds))
        return 0
    data_dir = args.data_dir
    if data_dir is None and args.scale == "smoke":
        from samfast.cifar.demo import DEMO_DATA
        data_dir = str(DEMO_DATA)
    seeds = args.seeds if args.seeds is not None else _value(args.scale, "seeds")
    from samfast.cifar.data import DataError
    from samfast.cifar.train import RunError
    try:
        table = reproduce(args, data_dir, seeds)
    except (DataError, RunError, config.ConfigError) as exc:
        print(f"samfast-reproduce: error: {exc}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
