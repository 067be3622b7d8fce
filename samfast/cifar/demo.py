"""samfast-demo: late-phase SAM in a few minutes on a CPU.

Trains the small CNN twice on the embedded CIFAR-10 subset (2,500 training and 500 test images
of the real data set, stratified; see scripts/make_demo_subset.py): plain SGD for all epochs,
and SGD switched to SAM for the last quarter of the epochs (Zhou et al., ICLR 2025). Same
seed, same data order, same schedule otherwise. Prints a comparison table (test accuracy
and loss, sharpness = top Hessian eigenvalue of the training loss on 512 training images,
training time) and writes
``OUT/comparison.png`` next to each run's own outputs.

The embedded subset is for this demo only: ``samfast-train`` reads real data from
``--data-dir``, ``$SAMFAST_DATA`` or the ``--download`` cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from samfast.cifar import train as trainer
from samfast.cifar.data import DataError

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


def demo_runs(epochs: int, sam_start: int) -> dict[str, list[str]]:
    common = ["--data-dir", str(DEMO_DATA), "--model", "small_cnn", "--epochs", str(epochs),
              "--batch-size", "128", "--lr", "0.05", "--lr-schedule", "cosine",
              "--weight-decay", "5e-4", "--seed", "0", "--quiet",
              "--overwrite",  # every demo retrains both runs
              # sharpness = top Hessian eigenvalue of the training loss, at the end only
              "--sharpness-every", str(epochs), "--sharpness-samples", "512",
              "--sharpness-iters", "20"]
    return {"SGD": common + ["--optimizer", "sgd"],
            f"SGD -> SAM (last {epochs - sam_start} epochs)":
                common + ["--optimizer", "sam", "--rho", "0.05", "--sam-start", str(sam_start)]}


def plot(path: Path, results: dict[str, dict], histories: dict[str, list]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, history in histories.items():
        evals = [r for r in history if r["test_acc"] is not None]
        ep = [r["epoch"] + 1 for r in evals]
        ax_loss.plot(ep, [r["test_loss"] for r in evals], label=name)
        ax_acc.plot(ep, [r["test_acc"] for r in evals], label=name)
        switch = [r["epoch"] for r in history if r["phase"].startswith("sam")]
        if switch:
            for ax in (ax_loss, ax_acc):
                ax.axvline(switch[0] + 0.5, color="gray", ls="--", lw=1)
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="test loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("samfast demo: small CNN, embedded CIFAR-10 subset (2,500 / 500 images)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="samfast-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--sam-start", type=int, default=12)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if not 0 <= args.sam_start <= args.epochs:
        ap.error(f"argument --sam-start: must be in 0..{args.epochs}")
    print(f"samfast demo: using the embedded CIFAR-10 subset in {DEMO_DATA} "
          "(2,500 train / 500 test images of the real data set; demo only)", file=sys.stderr)
    out = Path(args.out)
    results, histories = {}, {}
    for i, (name, argv_run) in enumerate(demo_runs(args.epochs, args.sam_start).items()):
        run_argv = argv_run + ["--out", str(out / f"run{i}")]
        if args.device:
            run_argv += ["--device", args.device]
        print(f"-- {name}", file=sys.stderr, flush=True)
        try:
            results[name] = trainer.run(trainer.parse_config(run_argv))
        except (DataError, trainer.RunError) as exc:
            print(f"samfast-demo: error: {exc}", file=sys.stderr)
            return 2
        histories[name] = [json.loads(line) for line in
                           (out / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
    rows = [f"| {name} | {r['sam_epochs']}/{r['epochs']} | {r['test_acc']:.1f} | "
            f"{r['test_loss']:.3f} | {r['sharpness']:.2f} | {r['train_time_s']:.1f} |"
            for name, r in results.items()]
    table = "\n".join(["| run | SAM epochs | test acc (%) | test loss | sharpness (top "
                       "Hessian eigenvalue) | train time (s) |", "|---|---|---|---|---|---|", *rows])
    print(table)
    (out / "comparison.md").write_text(table + "\n")
    plot(out / "comparison.png", results, histories)
    print(f"\nwrote {out / 'comparison.md'} and {out / 'comparison.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
