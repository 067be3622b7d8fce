"""PGD cost: generating PGD-10 examples vs 10 plain training forward+backward passes.

Same model, same batch, interleaved rounds, median. The attack needs only the input gradient
(the backward skips every weight gradient) and runs the model in eval mode, so it should cost
less than training passes, which compute weight gradients too.

    python bench/bench_pgd.py [--models small_cnn resnet20] [--batch-size 128] [--save]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samfast  # noqa: E402
from common import (environment, markdown_table, median, time_interleaved,  # noqa: E402
                    write_results)
from samfast.cifar.models import build_model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn", "resnet20"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    rows, raw = [], {}
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name).to(device)
        model.train()
        x = torch.rand(args.batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        gen = torch.Generator().manual_seed(0)

        def attack():
            samfast.pgd_attack(model, x, y, steps=args.steps, generator=gen)

        def train_passes():
            for _ in range(args.steps):
                model.zero_grad(set_to_none=False)
                F.cross_entropy(model(x), y).backward()
        samples = time_interleaved({"PGD": attack, "train": train_passes}, device,
                                   rounds=args.rounds, cold=False)
        raw[name] = samples
        pgd, train = median(samples["PGD"]), median(samples["train"])
        rows.append([name, pgd * 1e3, train * 1e3, pgd / train])
    table = markdown_table(["model", f"PGD-{args.steps} ms", f"{args.steps} train fwd+bwd ms",
                            "ratio"], rows)
    text = f"batch {args.batch_size}, fp32, L-inf eps 8/255, alpha 2/255\n\n{table}"
    print(text)
    if args.save:
        print("wrote", write_results("pgd", env, text, raw, None))


if __name__ == "__main__":
    main()
