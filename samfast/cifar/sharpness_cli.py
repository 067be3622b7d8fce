"""samfast-sharpness: top Hessian eigenvalues and the Hessian trace of a trained checkpoint.

    samfast-sharpness runs/fig1/last.pt --data-dir ../shared/data/cifar10 --k 2

Rebuilds the model from the checkpoint's config, and measures the training loss (mean
cross-entropy, BatchNorm in eval mode) on a fixed stratified subset of the training images.
Prints one line per eigenvalue with its residual and whether it converged (a warning on
stderr when one did not), then the result as one JSON line. A bad checkpoint, bad flags or
missing data end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import time
import warnings
from collections.abc import Mapping

import torch
from torch.nn import functional as F

import samfast
from samfast.cifar.data import (NUM_CLASSES, DataError, eval_batches, find_data_dir, load_cifar,
                                stratified_subset)
from samfast.cifar.models import MODELS, build_model

PROG = "samfast-sharpness"


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not describe a samfast-train model."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the whole usage before the error; one line is easier to act on
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as "Type: message" on one line, cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_model(path: str) -> tuple[torch.nn.Module, dict]:
    """The model a samfast-train checkpoint describes, with its weights, and the checkpoint."""
    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol note: the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # what torch.load raises for a missing or unreadable file (OSError), a truncated zip
    # (RuntimeError), an empty file (EOFError), a file that is no checkpoint at all (KeyError,
    # UnpicklingError from the legacy reader) and a pickle of other objects (UnpicklingError)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as exc:
        empty = " (an empty or truncated file)" if isinstance(exc, EOFError) else ""
        raise CheckpointError(f"cannot read {path}: {_one_line(exc)}{empty}") from exc
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("config"), Mapping) \
            or not isinstance(ckpt.get("model"), Mapping):
        raise CheckpointError(f"{path} is not a samfast-train checkpoint (it needs a 'config' "
                              f"and a 'model' entry; got {type(ckpt).__name__}"
                              + (f" with keys {sorted(map(str, ckpt))[:6]}"
                                 if isinstance(ckpt, Mapping) else "") + ")")
    cfg = ckpt["config"]
    name, dataset = cfg.get("model"), cfg.get("dataset")
    if not (isinstance(name, str) and name in MODELS
            and isinstance(dataset, str) and dataset in NUM_CLASSES):
        raise CheckpointError(f"{path}: config names model {name!r} and dataset {dataset!r}; "
                              f"known: models {', '.join(MODELS)}, datasets "
                              f"{', '.join(NUM_CLASSES)}")
    model = build_model(name, NUM_CLASSES[dataset], dataset)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
        raise CheckpointError(f"{path}: its weights do not fit a {name} for {dataset}: "
                              f"{_one_line(exc)}") from exc
    return model, ckpt


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a samfast-train last.pt")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--k", type=int, default=1, help="how many top eigenvalues")
    ap.add_argument("--samples", type=int, default=1024, help="training images used")
    ap.add_argument("--max-iter", type=int, default=100, help="Lanczos iterations at most")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="converged when the residual is within tol of the eigenvalue")
    ap.add_argument("--trace-samples", type=int, default=16,
                    help="Hutchinson samples for the trace (0: skip)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bn-mode", choices=("eval", "train"), default="eval")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for flag, value, least in (("--k", args.k, 1), ("--samples", args.samples, 1),
                               ("--max-iter", args.max_iter, 1),
                               ("--batch-size", args.batch_size, 1),
                               ("--trace-samples", args.trace_samples, 0)):
        if value < least:
            ap.error(f"argument {flag}: must be >= {least}, got {value}")
    if not (math.isfinite(args.tol) and args.tol > 0):
        ap.error(f"argument --tol: must be a finite number > 0, got {args.tol}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"argument --device: {_one_line(exc)}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"argument --device: {args.device} requested, but CUDA is not available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, ckpt = load_model(args.checkpoint)
    except CheckpointError as exc:
        print(f"{PROG}: error: checkpoint: {exc}", file=sys.stderr)
        return 2
    cfg = ckpt["config"]
    model.to(args.device)
    try:
        train, _ = load_cifar(find_data_dir(args.data_dir or cfg.get("data_dir")), cfg["dataset"])
    except DataError as exc:
        print(f"{PROG}: data error: {exc}", file=sys.stderr)
        return 2
    n = min(args.samples, len(train))
    subset = stratified_subset(train, n, seed=0) if n < len(train) else train
    batches = list(eval_batches(subset.to(args.device), args.batch_size))
    t0 = time.perf_counter()
    eigs, info = samfast.hessian_eigenvalues(model, F.cross_entropy, batches, k=args.k,
                                             max_iter=args.max_iter, tol=args.tol,
                                             bn_mode=args.bn_mode, return_info=True)
    result = {"checkpoint": args.checkpoint, "epoch": ckpt.get("epoch"), "samples": n,
              "eigenvalues": eigs.tolist(), "residuals": info.residuals,
              "eigenvalue_converged": info.eigenvalue_converged, "tol": args.tol,
              "lanczos_iterations": info.iterations, "converged": info.converged,
              "seconds": time.perf_counter() - t0}
    if args.trace_samples:
        trace, se = samfast.hessian_trace(model, F.cross_entropy, batches,
                                          n_samples=args.trace_samples, bn_mode=args.bn_mode,
                                          return_std=True)
        result.update(trace=trace, trace_stderr=se)
    print(f"{'':10} {'eigenvalue':>12} {'residual':>10}  converged")
    for i, (value, residual, ok) in enumerate(
            zip(result["eigenvalues"], info.residuals, info.eigenvalue_converged), 1):
        print(f"{f'lambda_{i}':10} {value:12.6g} {residual:10.2e}  {'yes' if ok else 'NO'}")
    if not info.converged:
        bad = info.eigenvalue_converged.count(False)
        print(f"{PROG}: warning: {bad} of {len(eigs)} eigenvalues did not converge in "
              f"{info.iterations} Lanczos iterations (residual > tol * |lambda|, tol "
              f"{args.tol:g}); they are estimates, not final values: raise --max-iter",
              file=sys.stderr)
    if args.trace_samples:
        print(f"trace    = {result['trace']:.6g} +- {result['trace_stderr']:.2g} "
              f"({args.trace_samples} Hutchinson samples)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
