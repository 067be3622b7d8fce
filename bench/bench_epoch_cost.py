"""Training cost of SAM and of a late switch, measured with the trainer in one run.

Runs ``samfast-train`` three times on the same data, model and seed: SGD for E epochs, SAM for
E epochs, and SGD switched to SAM at 75% of E. Reports the median SGD and SAM epoch times, their
ratio (two forward/backward passes: the floor is about 2), and the whole-run train time of the
late switch relative to pure SGD (75% SGD + 25% SAM: about 1.25x at that floor).

    python bench/bench_epoch_cost.py --data-dir ../shared/data/cifar10 --train-subset 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402
from samfast.cifar import train as trainer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2,
                    help="run the three configurations this many times, in turn, so that a "
                         "slow spell of a shared machine hits all of them")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    late = int(round(0.75 * args.epochs))
    runs = {"SGD": ["--optimizer", "sgd"], "SAM": ["--optimizer", "sam"],
            f"SGD -> SAM at epoch {late}": ["--optimizer", "sam", "--sam-start", str(late)]}
    env = environment(torch.device(args.device))
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    histories: dict[str, list] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for i, (name, flags) in enumerate(runs.items()):
                out = f"{tmp}/{rep}-{i}"
                cfg = trainer.parse_config([
                    "--data-dir", args.data_dir, "--train-subset", str(args.train_subset),
                    "--test-subset", "1000", "--model", args.model, "--epochs",
                    str(args.epochs), "--device", args.device, "--out", out, "--quiet",
                    "--eval-every", str(args.epochs), *flags])
                trainer.run(cfg)
                histories[name].append([json.loads(line) for line in
                                        Path(out, "metrics.jsonl").read_text().splitlines()])
    sgd_name, sam_name, late_name = runs

    def epoch_times(name, phase=None):
        return [r["epoch_time_s"] for h in histories[name] for r in h
                if phase is None or r["phase"] == phase]
    sgd_epoch = statistics.median(epoch_times(sgd_name))
    sam_epoch = statistics.median(epoch_times(sam_name))
    totals = {n: statistics.median(sum(r["epoch_time_s"] for r in h) for h in hs)
              for n, hs in histories.items()}
    rows = [[n, statistics.median(epoch_times(n)), totals[n], totals[n] / totals[sgd_name],
             statistics.mean(h[-1]["test_acc"] for h in hs)] for n, hs in histories.items()]
    table = markdown_table(["run", "median epoch s", "median train time s", "x SGD run",
                            "mean test acc %"], rows)
    text = (f"{args.model}, {args.train_subset} CIFAR-10 training images, {args.epochs} epochs, "
            f"batch 128, {args.repeats} repeats in turn\n\n{table}\n\n"
            f"SAM / SGD median epoch time: {sam_epoch / sgd_epoch:.3f}")
    print(text)
    if args.save:
        print("wrote", write_results("epoch_cost", env, text, histories, None))


if __name__ == "__main__":
    main()
