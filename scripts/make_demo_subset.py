"""Make the embedded demo data: a stratified subset of the real CIFAR-10 (<= 10 MB).

    python scripts/make_demo_subset.py ../shared/data/cifar10 samfast/cifar/demo_data

Takes 250 training images per class (2,500) and 50 test images per class (500) from the
official split, chosen by samfast.cifar.data.stratified_subset with seed 0 (the first images
of each class after a fixed shuffle), and writes them in the trainer's .npz layout
(train_0.npz, test.npz; x uint8 NHWC, y uint8) with their SHA-256 in SHA256SUMS.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

from samfast.cifar.data import load_cifar, stratified_subset


def main(src: str, dst: str) -> None:
    train, test = load_cifar(src, "cifar10")
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, split, n in (("train_0.npz", train, 2500), ("test.npz", test, 500)):
        sub = stratified_subset(split, n, seed=0)
        x = sub.x.permute(0, 2, 3, 1).contiguous().numpy()
        np.savez_compressed(out / name, x=x, y=sub.y.numpy().astype(np.uint8))
        sums.append(f"{hashlib.sha256((out / name).read_bytes()).hexdigest()}  {name}\n")
    (out / "SHA256SUMS").write_text("".join(sums))
    print("".join(sums), end="")


if __name__ == "__main__":
    main(*sys.argv[1:3])
