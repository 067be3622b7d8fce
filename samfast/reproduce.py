"""samfast-reproduce: the experiments of Zhou et al. (ICLR 2025), one command each.

    samfast-reproduce late_switch --scale small --data-dir ../shared/data/cifar10

Experiments: ``late_switch`` (Figure 1: SGD vs full SAM vs SGD -> SAM late), ``switch_sweep``
(the switch epoch swept), ``early_sam`` (SAM -> SGD), ``variants`` (ASAM and unnormalized SAM
as the late phase), ``adversarial`` (standard vs full PGD-AT vs late AT), ``generalization``
(issue #16) and ``efficient`` (issue #17: the late switch against the per-step SAM policies of
samfast/policies.py at matched budgets of extra passes, on one cost axis). Scales: ``smoke``
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
# The generalization experiment (issue #16): a regime where the paper's test-error claim can
# show on this CPU, near interpolation (SGD ends at >= 97% train accuracy), with the full
# 10,000-image test set, a step schedule like the paper's and five seeds; the SGD -> SAM runs
# are forked from their seed's SGD run at the switch epoch (the paired design: identical to it
# up to the switch, bit for bit). These settings replace the scale's own where they are given
# (the small scale's 10k-image, 20-epoch runs are the under-trained regime of the sharpness
# experiments); the full scale keeps the paper's.
GENERALIZATION = {
    "full": {"seeds": (5, "paper, Figure 1 (five seeds)")},
    "small": {
        "model": ("small_cnn_w48", "choice: the pilot (bench/results/generalization-pilot-*): "
                                   "the width-24 small CNN showed no SAM effect at all"),
        "train_subset": (2500, "choice: the pilot; 5,000 images did not interpolate in budget"),
        "test_subset": (None, "issue #16: the full 10,000-image test set"),
        "augment": ("none", "choice: the pilot; interpolation within the CPU budget"),
        "epochs": (80, "choice: the pilot (SGD at 100% train accuracy)"),
        "lr": (0.1, "choice"), "weight_decay": (5e-4, "code: the WRN recipe"),
        "lr_schedule": ("step_wrn", "code: x0.2 at 30/60/80% (the paper's step schedule)"),
        "label_smoothing": (0.1, "code default; without it the Hessian of a near-zero loss "
                                 "scales with the loss and SAM's ended sharper (pilot)"),
        "rho": (0.05, "code default for SAM"),
        "eval_every": (20, "choice: the test set at 4 points and the end"),
        "sharpness_every": (80, "choice: at the end of training"),
        "sharpness_samples": (1024, "choice"), "sharpness_k": (2, "code: top-2"),
        "sharpness_iters": (20, "choice"),
        "seeds": (5, "issue #16: >= 5 seeds"),
    },
    "smoke": {"epochs": (4, "choice"), "seeds": (2, "choice: paired differences need two")},
}
# SGD -> SAM for the last 25% and the last 10% of the epochs (issue #16).
LATE_FRACTIONS = (0.25, 0.10)
GRID_KEYS = ("late_switch_epoch", "rho_asam", "rho_usam", "seeds")
EXPERIMENTS = ("late_switch", "switch_sweep", "early_sam", "variants", "adversarial",
               "generalization")
# The cheaper-SAM comparison (issue #17). It runs in the generalization experiment's regime
# (GENERALIZATION: at small scale the near-interpolation CPU regime where SAM's test-error gain
# can show; its seeds), so its SGD, full-SAM and late-switch runs are the generalization
# grid's (copied when that grid has run them). Kept out of EXPERIMENTS, which `estimate`'s
# default and the tests of the paper's grid iterate; the CLI offers both.
EFFICIENT = "efficient"
ALL_EXPERIMENTS = EXPERIMENTS + (EFFICIENT,)
# Budgets in extra forward + backward passes over SGD: the fraction of steps that run SAM.
# Each policy is set to spend it: the late switch SAM for that fraction of the epochs,
# Interval and LookSAM k = 1 / budget, RandomSwitch p = budget, AE-SAM a constant threshold
# c with 1 - Phi(c) = budget (the fraction of SAM steps if ||g||^2 were normal, as AE-SAM
# assumes; what each run spent is measured and reported). The smoke scale runs one budget
# (its test trains every run).
BUDGETS = {"full": (0.10, 0.25), "small": (0.10, 0.25), "smoke": (0.25,)}
# LookSAM's alpha in this experiment: 0.2, not 0.7 (the public implementations' default).
# The reuse term adds alpha ||g|| along g_v whatever ||g_v|| was; in this regime SAM's own
# orthogonal part is ||g_v|| / ||g|| = 0.11 (median over the full steps of the first 6
# epochs, range 0.06-0.23), so 0.7 pushes ~6x harder than SAM does, and with SGD (lr 0.1,
# momentum 0.9) it did not train: 40% / 28% train accuracy after 80 epochs at k = 4 / 10,
# where every other run reached 100%; an independent loop of the paper's Algorithm 1 does the
# same (bench/results/looksam_alpha-*, bench/results/efficient-small-*/looksam_alpha0.7).
LOOKSAM_ALPHA = 0.2


def _regime(experiment: str | None) -> str | None:
    return "generalization" if experiment == EFFICIENT else experiment


def scale_settings(scale: str, experiment: str | None = None) -> dict:
    """The scale's settings, with the generalization experiment's replacing them there (and
    in the efficient experiment, which runs in its regime)."""
    chosen = dict(SETTINGS[scale])
    if _regime(experiment) == "generalization":
        chosen.update(GENERALIZATION[scale])
    return chosen


def _value(scale: str, key: str, experiment: str | None = None):
    return scale_settings(scale, experiment)[key][0]


def base_args(scale: str, data_dir: str | None, experiment: str | None = None) -> list[str]:
    """The samfast-train flags every run of the scale (and experiment) shares."""
    trainer_settings = {k: v for k, (v, _) in scale_settings(scale, experiment).items()
                        if k not in GRID_KEYS}
    args = config.to_argv(trainer_settings) + ["--quiet"]
    if data_dir:
        args += ["--data-dir", data_dir]
    return args


def settings_record(scale: str, data_dir: str | None,
                    experiment: str | None = None) -> dict[str, dict]:
    """settings.json: every trainer setting that affects the result (as a run of the scale
    gets it) and every grid setting, each with its value and source."""
    cfg = config.config_from_flags(base_args(scale, data_dir, experiment)).record()
    chosen = scale_settings(scale, experiment)
    record = {}
    for f in fields(config.RunConfig):
        if config.affects(f.name) is config.Affects.NOTHING:
            continue
        source = (chosen[f.name][1] if f.name in chosen
                  else config.source(f.name) or "samfast-train default")
        record[f.name] = {"value": cfg[f.name], "source": source}
    for key in GRID_KEYS:
        if key in chosen:
            record[key] = {"value": chosen[key][0], "source": chosen[key][1]}
    if _regime(experiment) == "generalization":
        record["late_fractions"] = {"value": list(LATE_FRACTIONS),
                                    "source": "issue #16: the last 25% and 10% of the epochs"}
    if experiment == EFFICIENT:
        record["budgets"] = {"value": list(BUDGETS[scale]), "source": "issue #17: 10% and 25% "
                             "extra passes over SGD (see reproduce.BUDGETS for each policy's "
                             "setting; one budget at smoke scale)"}
        record["looksam_alpha"] = {"value": LOOKSAM_ALPHA, "source": "choice: at 0.7 LookSAM "
                                   "did not train under SGD here (bench/results/looksam_alpha-*; "
                                   "reproduce.LOOKSAM_ALPHA)"}
        record["regime"] = {"value": "generalization", "source": "issue #17: the "
                            "generalization experiment's settings (reproduce.GENERALIZATION)"}
    return record


def switch_epochs(scale: str) -> list[int]:
    """The generalization experiment's switch epochs: SAM for the last 25% / 10%."""
    epochs = _value(scale, "epochs", "generalization")
    return sorted({epochs - max(1, round(f * epochs)) for f in LATE_FRACTIONS})


def efficient_policies(scale: str) -> dict[str, tuple[float, list[str]]]:
    """The efficient experiment's policy runs: name -> (budget, trainer flags), each policy
    at each budget of the scale (BUDGETS)."""
    runs = {}
    for budget in BUDGETS[scale]:
        k = round(1 / budget)
        c = statistics.NormalDist().inv_cdf(1 - budget)
        sam = ["--optimizer", "sam", "--sam-policy"]
        runs[f"interval k={k}"] = (budget, sam + ["interval", "--interval-k", str(k)])
        runs[f"LookSAM k={k} a={LOOKSAM_ALPHA:g}"] = (budget, sam + [
            "looksam", "--looksam-k", str(k), "--looksam-alpha", f"{LOOKSAM_ALPHA:g}"])
        runs[f"random p={budget:.2f}"] = (budget, sam + ["random", "--random-p", str(budget)])
        runs[f"AE-SAM c={c:.2f}"] = (budget, sam + ["adaptive", "--adaptive-lambda1",
                                                    f"{c:.4f}", "--adaptive-lambda2", f"{c:.4f}"])
    return runs


def forks_of(experiment: str, scale: str) -> dict[str, tuple[str, int]]:
    """Run name -> (run it forks from, epoch): the late switches share their seed's SGD run
    up to the switch (generalization and efficient experiments)."""
    if _regime(experiment) != "generalization":
        return {}
    return {f"SGD->SAM@{k}": ("SGD", k) for k in switch_epochs(scale)}


def runs_of(experiment: str, scale: str) -> dict[str, list[str]]:
    """Run name -> extra trainer flags."""
    epochs = _value(scale, "epochs")
    late = _value(scale, "late_switch_epoch", experiment) \
        if _regime(experiment) != "generalization" else None
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
    if _regime(experiment) == "generalization":
        ks = switch_epochs(scale)
        runs = {"SGD": ["--optimizer", "sgd", "--snapshot-epochs", ",".join(map(str, ks))],
                "SAM": ["--optimizer", "sam"],
                **{f"SGD->SAM@{k}": ["--optimizer", "sam", "--sam-start", str(k)] for k in ks}}
        if experiment == EFFICIENT:
            runs.update({name: flags for name, (_, flags) in efficient_policies(scale).items()})
        return runs
    raise ValueError(f"Invalid experiment: {experiment!r} (choose from "
                     f"{', '.join(ALL_EXPERIMENTS)})")


# Two-sided 95% quantiles of Student's t by degrees of freedom (the normal's 1.960 beyond 30).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table; the next
    smaller tabulated df, which errs wide)."""
    if df > 30:
        return 1.960
    return _T95[max(k for k in _T95 if k <= df)]


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of its 95% t-interval, n); the half-width is nan for n = 1."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return values[0], math.nan, 1
    return statistics.mean(values), t95(n - 1) * statistics.stdev(values) / math.sqrt(n), n


def _mean_ci(values: list[float], digits: int = 2) -> str:
    """'mean ± half-width of the 95% interval (n=k)'; a single run is shown as itself."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "n/a"
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={n})"


def summarize(root: Path, runs: dict, seeds: int) -> str:
    rows = ["| run | SAM epochs | AT epochs | test error % | test loss | sharpness | robust acc % "
            "| wall time s |", "|---|---|---|---|---|---|---|---|"]
    for name in runs:
        sums = [json.loads((root / _slug(name) / f"seed{k}" / "summary.json").read_text())
                for k in range(seeds)]
        rows.append("| " + " | ".join([
            name, str(sums[0]["sam_epochs"]), str(sums[0].get("adversarial_epochs", 0)),
            _mean_ci([100 - s["test_acc"] for s in sums]),
            _mean_ci([s["test_loss"] for s in sums], 3),
            _mean_ci([s.get("sharpness") for s in sums], 1),
            _mean_ci([s.get("robust_acc") for s in sums], 1),
            _mean_ci([s["wall_time_s"] for s in sums], 0)]) + " |")
    return ("Each cell: mean ± half-width of its 95% t-interval over seeds (n = seeds).\n\n"
            + "\n".join(rows))


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
    rows = ["| experiment | runs x seeds | SAM epochs | AT epochs | SGD-epoch equivalents | "
            "hours |", "|---|---|---|---|---|---|"]
    seen: dict[str, float] = {}
    for experiment in experiments:
        seeds = _value(scale, "seeds", experiment)
        cost, sam, adv, runs = 0.0, 0, 0, runs_of(experiment, scale)
        forks = forks_of(experiment, scale)
        for name, flags in runs.items():
            argv = base_args(scale, None, experiment) + flags
            cfg = config.config_from_flags(argv)
            sched = cfg.schedule()
            epochs = cfg.epochs
            n_sam, n_adv = sched.sam_epochs, sched.adversarial_epochs
            policy = cfg.policy(1)  # a SAM epoch under a policy: SAM on a fraction of steps
            fraction = None if policy is None else policy.fraction()
            n_sam = n_sam * (1.0 if fraction is None else fraction)
            c = (epochs - n_sam - n_adv + (n_sam * EPOCH_COST["sam"])
                 + n_adv * EPOCH_COST["adversarial"])
            if name in forks:  # the epochs before the fork are the source run's
                c -= forks[name][1]
            cost += c * seeds
            sam += n_sam * seeds
            adv += n_adv * seeds
            seen[config.run_key(config.run_identity(cfg, None, 1))] = c * seeds
        hours = f"{cost * sgd_epoch_s / 3600:.1f}" if sgd_epoch_s else "-"
        rows.append(f"| {experiment} | {len(runs)} x {seeds} | {sam:g} | {adv} | {cost:.0f} | "
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


def _seed_results(run_dir: Path) -> dict:
    """One finished run of the generalization grid, reduced to what its report needs. A
    forked run's first rows are its source's (``inherited``): its own cost starts there."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    own = [r for r in rows if not r.get("inherited")]
    sam = [r for r in rows if r["phase"].startswith("sam")]
    top = (summary.get("hessian_top") or []) + [math.nan, math.nan]
    return {"error": 100 - summary["test_acc"], "train_acc": summary["train_acc"],
            "test_images": summary["config"].get("test_subset") or 10_000,
            "top1": top[0], "top2": top[1], "epochs": len(rows), "sam_epochs": len(sam),
            "own_epochs": len(own), "own_sam_epochs": sum(r in sam for r in own),
            "own_train_s": sum(r["epoch_time_s"] for r in own),
            "sgd_epoch_s": [r["epoch_time_s"] for r in own if r["phase"] == "sgd"],
            "sam_epoch_s": [r["epoch_time_s"] for r in own if r["phase"] == "sam"],
            "forked_at": (summary.get("fork") or {}).get("epoch")}


def _share_recovered(sgd: list[float], sam: list[float], late: list[float],
                     resamples: int = 10_000) -> tuple[float, float, float]:
    """How much of full SAM's gain over SGD (in test error) the late switch recovers:
    mean(sgd - late) / mean(sgd - sam), with a 95% percentile interval from resampling the
    seeds (paired: a seed's three runs stay together). nan where SAM gains nothing."""
    import random
    n = len(sgd)

    def ratio(idx) -> float:
        gain = sum(sgd[i] - sam[i] for i in idx)
        return sum(sgd[i] - late[i] for i in idx) / gain if gain > 0 else math.nan
    point = ratio(range(n))
    rng = random.Random(0)
    draws = sorted(r for r in (ratio([rng.randrange(n) for _ in range(n)])
                               for _ in range(resamples)) if not math.isnan(r))
    if math.isnan(point) or len(draws) < resamples // 2:
        return point, math.nan, math.nan
    return point, draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]


def report_generalization(root: Path, runs: dict, seeds: int, scale: str) -> str:
    """results.md, results.json and figure.png of the generalization experiment: test error
    with 95% intervals, paired differences from SGD, the share of full SAM's gain that each
    late switch recovers, the top-2 Hessian eigenvalues, time and cost."""
    res = {name: [_seed_results(root / _slug(name) / f"seed{k}") for k in range(seeds)]
           for name in runs}
    epochs = res["SGD"][0]["epochs"]
    err = {name: [r["error"] for r in rs] for name, rs in res.items()}

    def cell(values, digits=2):
        return _mean_ci(values, digits).replace(f" (n={seeds})", "")
    sgd_epoch = statistics.median(t for r in res["SGD"] for t in r["sgd_epoch_s"])
    sam_times = [t for r in res["SAM"] for t in r["sam_epoch_s"]]
    measured_ratio = statistics.median(sam_times) / sgd_epoch
    # Cost counts forward + backward passes (a SAM epoch = 2 SGD epochs): the runs of a grid
    # are trained hours apart, on a machine whose load changes (the small grid, 2026-12-02:
    # its SGD runs shared the cores with test runs, its SAM runs mostly did not, and the
    # median SAM epoch measured 0.63x an SGD epoch). Epoch times from different runs are not
    # comparable; an interleaved measurement is (bench/bench_epoch_cost.py: SAM / SGD = 2.00).
    sam_ratio = 2.0
    rows = ["| run | SAM epochs | train acc % | test error % | vs SGD (paired) | λ1 | λ2 | "
            "own train time s | cost, SGD-epoch eq. (own) |", "|---" * 9 + "|"]
    for name, rs in res.items():
        diff = "—" if name == "SGD" else cell([a - b for a, b in zip(err[name], err["SGD"])])
        own_cost = rs[0]["own_epochs"] + rs[0]["own_sam_epochs"] * (sam_ratio - 1)
        total_cost = epochs + rs[0]["sam_epochs"] * (sam_ratio - 1)
        cost = (f"{total_cost:.1f} ({own_cost:.1f})" if rs[0]["forked_at"] is not None
                else f"{total_cost:.1f}")
        rows.append("| " + " | ".join([
            name, str(rs[0]["sam_epochs"]), cell([r["train_acc"] for r in rs]), cell(err[name]),
            diff, cell([r["top1"] for r in rs], 1), cell([r["top2"] for r in rs], 1),
            cell([r["own_train_s"] for r in rs], 0), cost]) + " |")
    shares = []
    for name in runs:
        if name.startswith("SGD->SAM@"):
            point, lo, hi = _share_recovered(err["SGD"], err["SAM"], err[name])
            interval = f"[{lo:.0%}, {hi:.0%}]" if not math.isnan(lo) else "(interval undefined)"
            shares.append(f"- {name}: {point:.0%} {interval}" if not math.isnan(point) else
                          f"- {name}: undefined (full SAM does not lower the mean error)")
    gain_mean, gain_half, _ = mean_ci([a - b for a, b in zip(err["SGD"], err["SAM"])])
    text = "\n".join([
        f"Test error on {res['SGD'][0]['test_images']:,} test images; each cell: mean ± half-width of the 95% "
        f"t-interval over {seeds} seeds; 'vs SGD' is the paired difference (same seed: same "
        f"initialization, data order and, for the late switches, the very same SGD run up to "
        f"the switch). λ1, λ2: top Hessian eigenvalues of the training loss. Cost: SGD-epoch "
        f"equivalents in forward + backward passes (a SAM epoch = 2; in parentheses, what a "
        f"forked run adds to its SGD run). Own train time: wall seconds of the run's own "
        f"epochs, as the shared machine gave them (the median SAM epoch took "
        f"{measured_ratio:.2f}x the median SGD epoch across runs trained at different times: "
        f"not a cost measurement).", "", *rows, "",
        f"Full SAM's gain over SGD: {gain_mean:.2f} ± {gain_half:.2f} points of test error. "
        "Share of it recovered by each late switch (95% interval from resampling seeds):",
        *shares])
    (root / "results.md").write_text(f"# generalization ({scale}, {seeds} seeds)\n\n{text}\n")
    (root / "results.json").write_text(json.dumps(res, indent=1))
    _plot_generalization(root, res, epochs)
    return text


def _plot_generalization(root: Path, res: dict, epochs: int) -> None:
    """Test error and top eigenvalue against the number of final SAM epochs (0: SGD, all:
    full SAM), mean with 95% interval and each seed's runs joined (the pairing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(res, key=lambda name: res[name][0]["sam_epochs"])
    xs = [res[name][0]["sam_epochs"] for name in order]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "error", "test error (%)"),
                           (axes[1], "top1", "top Hessian eigenvalue")):
        seeds = len(res[order[0]])
        for k in range(seeds):
            ax.plot(xs, [res[name][k][key] for name in order], color="gray", alpha=0.35, lw=1)
        stats = [mean_ci([r[key] for r in res[name]]) for name in order]
        ax.errorbar(xs, [m for m, _, _ in stats], yerr=[h for _, h, _ in stats], marker="o",
                    capsize=4, color="C0", lw=2, label=f"mean, 95% interval ({seeds} seeds)")
        ax.set(xlabel=f"SAM epochs at the end of training (of {epochs}; 0 = SGD)", ylabel=label)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("test error: SGD -> SAM switched late")
    axes[1].set_title("sharpness at the end of training")
    fig.tight_layout()
    fig.savefig(root / "figure.png", dpi=110)
    plt.close(fig)


# =============================================================================================
# the efficient experiment (issue #17): every way to spend a budget of SAM steps, one cost axis
# =============================================================================================

def _efficient_seed(run_dir: Path) -> dict:
    """One finished run reduced to the report's numbers. Epochs trained before the trainer
    measured costs (a run copied from the generalization grid, or the SGD epochs a late
    switch inherits from one) count their passes only, as many as the epoch's phase implies
    (one per step, two in a SAM epoch: such runs have no per-step policy); ``estimated``
    says how many epochs did."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = summary["config"]
    steps = math.ceil((cfg.get("train_subset") or 50_000) / cfg["batch_size"])
    passes = cost = sam_steps = total_steps = 0.0
    estimated = 0
    for row in rows:
        if "cost_sgd_steps" in row:
            passes += row["passes"]
            cost += row["cost_sgd_steps"]
            sam_steps += row["sam_steps"]
            total_steps += row["steps"]
        else:
            sam = steps if row["phase"].startswith("sam") else 0
            passes += steps + sam
            cost += steps + sam
            sam_steps += sam
            total_steps += steps
            estimated += 1
    top = (summary.get("hessian_top") or [summary.get("sharpness", math.nan)]) + [math.nan]
    return {"error": 100 - summary["test_acc"], "train_acc": summary["train_acc"],
            "top1": top[0], "test_images": cfg.get("test_subset") or 10_000,
            "sam_epochs": summary["sam_epochs"], "epochs": summary["epochs"],
            "policy": cfg.get("sam_policy", "switch"), "sam_fraction": sam_steps / total_steps,
            "passes": passes, "cost": cost, "estimated": estimated}


def report_efficient(root: Path, runs: dict, seeds: int, scale: str) -> str:
    """results.md, results.json and figure.png of the efficient experiment: per run the
    fraction of SAM steps, the extra passes over SGD, the cost in SGD-step equivalents
    relative to the same seed's SGD run, final test error (and its paired difference from
    SGD) and sharpness, each a mean with its 95% t-interval over seeds."""
    res = {name: [_efficient_seed(root / _slug(name) / f"seed{k}") for k in range(seeds)]
           for name in runs}
    sgd = res["SGD"]

    def cell(values, digits=2):
        return _mean_ci(values, digits).replace(f" (n={seeds})", "")

    def paired(rs, base, key):  # per seed: the run's value minus the base run's
        return [r[key] - b[key] for r, b in zip(rs, base)]
    rows = ["| run | budget | SAM steps % | extra passes % | cost x SGD | train acc % | "
            "test error % | vs SGD (paired) | λ1 (sharpness) | λ1 vs SGD (paired) | "
            "λ1 drop per 10% extra passes | λ1 vs late switch (paired) |", "|---" * 12 + "|"]
    budgets = _efficient_budgets(runs, scale)
    # the late switch of each budget: the paper's answer, which each policy is measured against
    late = {tag: res[name] for name, tag in budgets.items()
            if efficient_family(name) == "SGD->SAM"}
    for name, rs in res.items():
        mark = "†" if any(r["estimated"] for r in rs) else ""
        extra = [100 * (r["passes"] / s["passes"] - 1) for r, s in zip(rs, sgd)]
        # a cost ratio only where both runs measured every epoch: a measured run over a
        # passes-only one would charge optimizer time to one side alone
        measured = all(not r["estimated"] and not s["estimated"] for r, s in zip(rs, sgd))
        ratio = (cell([r["cost"] / s["cost"] for r, s in zip(rs, sgd)], 3) if measured
                 else "—")
        diff = "—" if name == "SGD" else cell(paired(rs, sgd, "error"))
        # flatness bought per extra pass, paired by seed: (SGD's λ1 - the run's) for each
        # 10% of passes the run spent over its seed's SGD run
        flat = flat_per = "—"
        if name != "SGD":
            vs_sgd = paired(rs, sgd, "top1")
            flat = cell(vs_sgd, 1)
            flat_per = cell([-d / (e / 10) if e > 0 else math.nan
                             for d, e in zip(vs_sgd, extra)], 1)
        switch = late.get(budgets.get(name))
        vs_late = ("—" if switch is None or efficient_family(name) == "SGD->SAM"
                   else cell(paired(rs, switch, "top1"), 1))
        sharp = [cell([r["top1"] for r in rs], 1), flat, flat_per, vs_late]
        if statistics.mean(r["train_acc"] for r in rs) < FITTED:  # λ1 at another loss
            sharp = [c if c == "—" else f"({c})" for c in sharp]
        rows.append("| " + " | ".join([
            name + mark, budgets.get(name, "—"), cell([100 * r["sam_fraction"] for r in rs], 1),
            cell(extra, 1), ratio, cell([r["train_acc"] for r in rs], 1),
            cell([r["error"] for r in rs]), diff, *sharp]) + " |")
    text = "\n".join([
        f"Test error on {sgd[0]['test_images']:,} test images after {sgd[0]['epochs']} epochs; "
        f"each cell: mean ± half-width of the 95% t-interval over {seeds} seeds. Budget: the "
        "extra forward + backward passes over SGD the run was set to spend (AE-SAM's threshold "
        "assumes a normal ||g||^2); 'SAM steps' and 'extra passes' are what it spent. Cost: "
        "SGD-step equivalents (passes + measured optimizer time; samfast/cifar/train.py "
        "epoch_cost) over the same seed's SGD run's. 'vs SGD' is the paired difference in test "
        "error (same seed: same initialization and data order). Train acc: the last epoch's, "
        "on the fly. λ1: top Hessian eigenvalue of the training loss at the end, comparable "
        "between runs that end at the same training loss (a run that did not fit the training "
        f"set, mean train acc below {FITTED:g}%, sits elsewhere: its λ1 cells are in "
        "parentheses); 'λ1 vs SGD' is its paired difference, and 'λ1 drop per 10% extra "
        "passes' is, per seed, SGD's λ1 minus the run's for each 10% of passes the run spent "
        "over SGD's: flatness per extra pass, larger is cheaper flatness; 'λ1 vs late switch' "
        "is a policy's λ1 minus that of the late switch of the same budget and seed (negative: "
        "flatter than the paper's recipe for the same passes). †: some epochs of "
        "this run were trained before costs were measured and count their passes only; its "
        "cost ratio (and every run's, when SGD's is such a run) is then not given, and the "
        "figure's x axis is passes, exact for every run.", "", *rows])
    (root / "results.md").write_text(f"# efficient ({scale}, {seeds} seeds)\n\n{text}\n")
    (root / "results.json").write_text(json.dumps(res, indent=1))
    _plot_efficient(root, res)
    return text


def _efficient_budgets(runs: dict, scale: str) -> dict[str, str]:
    """Run name -> its budget in extra passes over SGD (SGD and full SAM have none)."""
    epochs = _value(scale, "epochs", EFFICIENT)
    out = {f"SGD->SAM@{k}": f"{100 * (epochs - k) / epochs:.0f}%" for k in switch_epochs(scale)}
    out.update({name: f"{100 * budget:.0f}%"
                for name, (budget, _) in efficient_policies(scale).items()})
    return {name: tag for name, tag in out.items() if name in runs}


# family of runs -> (legend title, color, marker) in the efficient experiment's figure
EFFICIENT_FAMILIES = {"SGD": ("SGD", "k", "s"), "SAM": ("full SAM", "C3", "s"),
                      "SGD->SAM": ("late switch", "C0", "o"), "interval": ("Interval", "C1", "^"),
                      "LookSAM": ("LookSAM", "C2", "v"), "random": ("RandomSwitch", "C4", "D"),
                      "AE-SAM": ("AE-SAM", "C5", "P")}


def efficient_family(name: str) -> str:
    """The family of an efficient-experiment run: the longest family name it starts with
    ("SGD->SAM@60" is a late switch, not SGD)."""
    return next(f for f in sorted(EFFICIENT_FAMILIES, key=len, reverse=True)
                if name == f or name.startswith(f))


# train accuracy (%) from which a run counts as having fitted the training set (the figure)
FITTED = 99.0


def _plot_efficient(root: Path, res: dict) -> None:
    """Test error, sharpness and its paired difference from SGD (the seed-to-seed spread of
    λ1 cancels there) against forward + backward passes (x the same seed's SGD
    run; exact for every run, while optimizer time is measured only in runs trained since
    cost accounting), mean and 95% interval per run, one marker per family of runs; hollow
    where a run did not fit the training set (mean train accuracy below FITTED): its λ1 is
    measured at a higher training loss than the others'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sgd = res["SGD"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    panels = ((axes[0], "test error (%)", lambda r, s: r["error"]),
              (axes[1], "top Hessian eigenvalue λ1", lambda r, s: r["top1"]),
              (axes[2], "λ1 minus the same seed's SGD run's", lambda r, s: r["top1"] - s["top1"]))
    for ax, label, value in panels:
        labelled = set()
        for name, rs in res.items():
            title, color, marker = EFFICIENT_FAMILIES[efficient_family(name)]
            x = mean_ci([r["passes"] / s["passes"] for r, s in zip(rs, sgd)])
            y = mean_ci([value(r, s) for r, s in zip(rs, sgd)])
            fitted = statistics.mean(r["train_acc"] for r in rs) >= FITTED
            ax.errorbar(x[0], y[0], xerr=None if math.isnan(x[1]) else x[1],
                        yerr=None if math.isnan(y[1]) else y[1], marker=marker, color=color,
                        markerfacecolor=color if fitted else "none", capsize=3, ls="none",
                        label=None if title in labelled else title)
            labelled.add(title)
            ax.annotate(name if fitted else f"{name} (not fitted)", (x[0], y[0]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="forward + backward passes (x SGD)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("test error vs passes")
    axes[1].set_title("sharpness vs passes")
    axes[2].set_title("sharpness vs passes, paired by seed")
    fig.tight_layout()
    fig.savefig(root / "figure.png", dpi=110)
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
    forks = forks_of(args.experiment, args.scale)
    extra = ["--device", args.device] if args.device else []
    fingerprint = _Fingerprints()
    plan, conflicts = [], []
    # Seed-major: every run of seed k before any of seed k+1, so a grid stopped part way
    # leaves whole seeds for the paired report (runs_of lists a fork's source run first).
    for seed in range(seeds):
        for name, flags in runs.items():
            out = root / _slug(name) / f"seed{seed}"
            argv = (base_args(args.scale, data_dir, args.experiment) + flags
                    + ["--seed", str(seed)] + extra)
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
    (root / "settings.json").write_text(json.dumps(
        settings_record(args.scale, data_dir, args.experiment), indent=1))
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
            source = None
            if name in forks:  # from the SGD run's snapshot, if that run kept it
                from_name, epoch = forks[name]
                snap = root / _slug(from_name) / f"seed{seed}" / f"epoch_{epoch}.pt"
                source = snap if snap.exists() else None
            # --resume below continues an interrupted run from its last.pt, whatever it forked from
            how = ("resuming its interrupted run" if status == "interrupted"
                   else f"forked from {source}" if source else "from scratch")
            print(f"run  {name} seed {seed} ({how})", file=sys.stderr, flush=True)
            _run_one(argv + ["--out", str(out), "--resume"]
                     + (["--fork-from", str(source)] if source else []), args.torchrun)
            finished.setdefault(key, out)
    if args.experiment == "generalization":
        return report_generalization(root, runs, seeds, args.scale)
    if args.experiment == EFFICIENT:
        return report_efficient(root, runs, seeds, args.scale)
    table = summarize(root, runs, seeds)
    (root / "results.md").write_text(f"# {args.experiment} ({args.scale}, {seeds} seeds)\n\n"
                                     f"{table}\n")
    plot(root, runs, seeds, args.experiment)
    if args.experiment in ("switch_sweep", "early_sam"):
        plot_vs_switch(root, runs, seeds, args.experiment)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="samfast-reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=ALL_EXPERIMENTS)
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
        print(estimate(args.scale, ALL_EXPERIMENTS, sgd_epoch_s=args.sgd_epoch_seconds))
        return 0
    data_dir = args.data_dir
    if data_dir is None and args.scale == "smoke":
        from samfast.cifar.demo import DEMO_DATA
        data_dir = str(DEMO_DATA)
    seeds = args.seeds if args.seeds is not None else _value(args.scale, "seeds",
                                                                   args.experiment)
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
