"""CIFAR data: loading, stratified subsets, and batched on-device augmentation.

Two on-disk layouts are read:

* compressed NumPy shards (``train_*.npz`` + ``test.npz``, arrays ``x`` uint8 NHWC and ``y``),
  loaded with ``allow_pickle=False``;
* the official python folders (``cifar-10-batches-py``, ``cifar-100-python``), read through
  torchvision's CIFAR classes, which check every file's MD5 before unpickling it.

Images stay uint8 on the training device (50k CIFAR images are 150 MiB); each batch is cropped
(random translation within a zero padding of 4) and flipped (or only flipped, or neither) and
optionally cut out by a handful of batched tensor ops, with no per-image Python and no
DataLoader workers. Every random draw
comes from a generator seeded by (seed, epoch), so an epoch is reproducible on its own: a run
resumed at an epoch boundary sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samfast" / "data"


class DataError(RuntimeError):
    """Missing, corrupt or wrong-shaped data."""


@dataclass
class Split:
    x: torch.Tensor  # uint8, N x 3 x 32 x 32
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


def _check_arrays(x: np.ndarray, y: np.ndarray, classes: int, where: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(f"{where}: x must be uint8 of shape (N, 32, 32, 3), got {x.dtype} "
                        f"{x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must be N integer labels, got {y.dtype} {y.shape} for "
                        f"{len(x)} images")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{where}: labels must lie in 0..{classes - 1}, got {y.min()}..{y.max()}")


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                 torch.from_numpy(y.astype(np.int64)))


def _load_npz(paths: list[str], classes: int) -> Split:
    xs, ys = [], []
    for path in paths:
        # A truncated archive raises BadZipFile or EOFError, a damaged member zlib.error or
        # BadZipFile (CRC), a pickled or damaged array header ValueError.
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["x"], f["y"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            detail = (str(exc).splitlines() or [""])[0]
            raise DataError(f"{path}: not a readable .npz with arrays 'x' and 'y' "
                            f"({type(exc).__name__}: {detail})") from exc
        _check_arrays(x, y, classes, path)
        xs.append(x)
        ys.append(y)
    return _split(np.concatenate(xs), np.concatenate(ys))


def _load_torchvision(root: str, dataset: str, download: bool) -> tuple[Split, Split]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{root}: {exc}") from exc
    out = []
    for part in (train, test):
        x, y = np.asarray(part.data), np.asarray(part.targets)
        _check_arrays(x, y, NUM_CLASSES[dataset], root)
        out.append(_split(x, y))
    return out[0], out[1]


def find_data_dir(data_dir: str | None) -> str:
    """``--data-dir``, else ``$SAMFAST_DATA``, else the cache that ``--download`` fills."""
    for candidate in (data_dir, os.environ.get("SAMFAST_DATA"), str(DEFAULT_CACHE)):
        if candidate:
            return candidate
    raise AssertionError("unreachable")


def load_cifar(data_dir: str, dataset: str = "cifar10",
               download: bool = False) -> tuple[Split, Split]:
    """(train, test) from ``data_dir`` in either layout (see the module docstring)."""
    if dataset not in NUM_CLASSES:
        raise ValueError(f"Invalid dataset: {dataset!r} (choose from {', '.join(NUM_CLASSES)})")
    train_npz = sorted(glob.glob(os.path.join(data_dir, "train_*.npz")))
    test_npz = os.path.join(data_dir, "test.npz")
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    if train_npz and os.path.exists(test_npz):
        classes = NUM_CLASSES[dataset]
        train, test = _load_npz(train_npz, classes), _load_npz([test_npz], classes)
    elif download or os.path.isdir(os.path.join(data_dir, folder)):
        train, test = _load_torchvision(data_dir, dataset, download)
    else:
        raise DataError(f"no {dataset} data in {data_dir!r}: expected train_*.npz + test.npz, "
                        f"or the official {folder}/ folder (or pass --download)")
    for name, split in (("training", train), ("test", test)):
        if not len(split):
            raise DataError(f"no {name} images in {data_dir!r}")
    return train, test


def stratified_subset(split: Split, n: int, seed: int = 0) -> Split:
    """``n`` examples with the class proportions of ``split`` (equal counts for CIFAR), drawn
    with a fixed generator so every run and every resume picks the same ones."""
    if not 0 < n <= len(split):
        raise ValueError(f"Invalid subset size: {n} (must be in 1..{len(split)})")
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(split.y)
    order = torch.randperm(len(split), generator=gen)
    y = split.y[order]
    per_class = {int(c): order[y == c] for c in classes}
    # Largest remainder: floor of the proportional share, then one more to the largest rests.
    shares = {c: n * len(idx) / len(split) for c, idx in per_class.items()}
    counts = {c: int(s) for c, s in shares.items()}
    for c in sorted(shares, key=lambda c: (counts[c] - shares[c], c))[:n - sum(counts.values())]:
        counts[c] += 1
    keep = torch.cat([per_class[c][:counts[c]] for c in sorted(per_class)]).sort().values
    return Split(split.x[keep], split.y[keep])


def augment(x: torch.Tensor, gen: torch.Generator, cutout: int = 0,
            mode: str = "crop_flip") -> torch.Tensor:
    """For a uint8 N x C x 32 x 32 batch, batched: ``mode`` "crop_flip" a random crop
    (translation within a zero padding of 4) then a horizontal flip, "flip" the flip alone,
    "none" neither; then, with ``cutout``, a zeroed ``cutout`` x ``cutout`` square. The draws
    come in that order from ``gen`` (crop, flip, cutout)."""
    if mode not in ("crop_flip", "flip", "none"):
        raise ValueError(f"Invalid augmentation mode: {mode!r} (crop_flip, flip or none)")
    n, c, h, w = x.shape
    dev = x.device
    out = x
    if mode == "crop_flip":
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n,), generator=gen).to(dev)
        dx = torch.randint(0, 9, (n,), generator=gen).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        out = padded[batch, chan, rows, cols]
    if mode != "none":
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if cutout:
        cy = torch.randint(0, h, (n,), generator=gen).to(dev)
        cx = torch.randint(0, w, (n,), generator=gen).to(dev)
        ys = torch.arange(h, device=dev)[None, :]
        xs = torch.arange(w, device=dev)[None, :]
        inside_y = (ys >= (cy[:, None] - cutout // 2)) & (ys < (cy[:, None] + (cutout + 1) // 2))
        inside_x = (xs >= (cx[:, None] - cutout // 2)) & (xs < (cx[:, None] + (cutout + 1) // 2))
        hole = inside_y[:, None, :, None] & inside_x[:, None, None, :]
        out = out.masked_fill(hole, 0)
    return out


def fingerprint(split: Split) -> str:
    """SHA-256 of the images and labels (and their shapes): equal digests, the same data."""
    digest = hashlib.sha256()
    for t in (split.x, split.y.to(torch.int64)):
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().data)
    return digest.hexdigest()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_batches(split: Split, batch_size: int, gen: torch.Generator, cutout: int = 0,
                  drop_last: bool = False, rank: int = 0, world: int = 1,
                  order_generator: torch.Generator | None = None, augmentation: str = "crop_flip"):
    """Shuffled, augmented (x float in [0, 1], y) batches of one epoch.

    With ``world`` > 1, every rank walks the same global batches (the order comes from
    ``order_generator``, the same on every rank) and takes the slice ``rank::world`` of each:
    the device-resident data are sharded without a sampler. ``gen`` draws the augmentation.
    """
    order = torch.randperm(len(split), generator=order_generator or gen).to(split.x.device)
    stop = len(split) - (len(split) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size][rank::world]
        x = augment(split.x[idx], gen, cutout, augmentation)
        yield x.float().div_(255), split.y[idx]


def eval_batches(split: Split, batch_size: int):
    for start in range(0, len(split), batch_size):
        yield split.x[start:start + batch_size].float().div_(255), split.y[start:start + batch_size]
