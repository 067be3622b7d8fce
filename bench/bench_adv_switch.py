"""Late switch to adversarial training: standard training vs full PGD-AT vs AT only late.

Three samfast-train runs with the same data, model, seed and epochs; PGD-10 (L-inf, 8/255,
step 2/255) adversarial training for all epochs, for the last 30% only, or never; clean and
PGD-20 robust accuracy on a fixed stratified test subset at the end, and the train time of each.

    python bench/bench_adv_switch.py --data-dir ../shared/data/cifar10 --train-subset 2000
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--train-subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    late = round(0.7 * args.epochs)
    runs = {"standard": [], "full AT": ["--adv-start", "0"],
            f"AT from epoch {late} (last {args.epochs - late})": ["--adv-start", str(late)]}
    env = environment(torch.device("cpu"))
    print(", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(runs.items()):
            cfg = trainer.parse_config([
                "--data-dir", args.data_dir, "--train-subset", str(args.train_subset),
                "--test-subset", "1000", "--model", args.model, "--epochs", str(args.epochs),
                "--optimizer", "sgd", "--lr-schedule", "cosine", "--lr", "0.05",
                "--adv-eps", "8/255", "--adv-alpha", "2/255", "--adv-steps", "10",
                "--eval-robust-every", str(args.epochs), "--eval-pgd-steps", "20",
                "--eval-robust-samples", "500", "--device", "cpu", "--quiet",
                "--out", f"{tmp}/{i}", *flags])
            s = trainer.run(cfg)
            raw[name] = s
            rows.append([name, s["adversarial_epochs"], s["test_acc"], s["robust_acc"],
                         s["train_time_s"]])
            print(rows[-1], flush=True)
    table = markdown_table(["run", "AT epochs", "clean test acc %", "PGD-20 robust acc %",
                            "train time s"], rows)
    text = (f"{args.model}, {args.train_subset} real CIFAR-10 training images, {args.epochs} "
            f"epochs, SGD, cosine lr 0.05; AT = PGD-10 L-inf 8/255 step 2/255; robust accuracy "
            f"PGD-20 on 500 test images, clean accuracy on 1,000\n\n{table}")
    print(text)
    if args.save:
        print("wrote", write_results("adv_switch", env, text, raw, None))


if __name__ == "__main__":
    main()
