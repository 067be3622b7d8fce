"""samfast-sharpness: top Hessian eigenvalues and the Hessian trace of a trained checkpoint.

    samfast-sharpness runs/fig1/last.pt --data-dir ../shared/data/cifar10 --k 2

Rebuilds the model from the checkpoint's config, and measures the training loss (mean
cross-entropy, BatchNorm in eval mode) on a fixed stratified subset of the training images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.nn import functional as F

import samfast
from samfast.cifar.data import (NUM_CLASSES, DataError, eval_batches, find_data_dir, load_cifar,
                                stratified_subset)
from samfast.cifar.models import build_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="samfast-sharpness", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a samfast-train last.pt")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--k", type=int, default=1, help="how many top eigenvalues")
    ap.add_argument("--samples", type=int, default=1024, help="training images used")
    ap.add_argument("--max-iter", type=int, default=100, help="Lanczos iterations at most")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--trace-samples", type=int, default=16,
                    help="Hutchinson samples for the trace (0: skip)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bn-mode", choices=("eval", "train"), default="eval")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for flag, value in (("--k", args.k), ("--samples", args.samples),
                        ("--max-iter", args.max_iter), ("--batch-size", args.batch_size)):
        if value < 1:
            ap.error(f"argument {flag}: must be >= 1, got {value}")
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        ap.error(f"argument checkpoint: cannot read {args.checkpoint}: {exc}")
    cfg = ckpt["config"]
    device = torch.device(args.device)
    model = build_model(cfg["model"], NUM_CLASSES[cfg["dataset"]], cfg["dataset"])
    model.load_state_dict(ckpt["model"])
    model.to(device)
    try:
        train, _ = load_cifar(find_data_dir(args.data_dir or cfg.get("data_dir")), cfg["dataset"])
    except DataError as exc:
        print(f"samfast-sharpness: data error: {exc}", file=sys.stderr)
        return 2
    n = min(args.samples, len(train))
    subset = stratified_subset(train, n, seed=0) if n < len(train) else train
    batches = list(eval_batches(subset.to(device), args.batch_size))
    t0 = time.perf_counter()
    eigs, info = samfast.hessian_eigenvalues(model, F.cross_entropy, batches, k=args.k,
                                             max_iter=args.max_iter, tol=args.tol,
                                             bn_mode=args.bn_mode, return_info=True)
    result = {"checkpoint": args.checkpoint, "epoch": ckpt.get("epoch"), "samples": n,
              "eigenvalues": eigs.tolist(), "lanczos_iterations": info.iterations,
              "converged": info.converged, "seconds": time.perf_counter() - t0}
    if args.trace_samples:
        trace, se = samfast.hessian_trace(model, F.cross_entropy, batches,
                                          n_samples=args.trace_samples, bn_mode=args.bn_mode,
                                          return_std=True)
        result.update(trace=trace, trace_stderr=se)
    for i, value in enumerate(result["eigenvalues"], 1):
        print(f"lambda_{i} = {value:.6g}")
    if args.trace_samples:
        print(f"trace    = {result['trace']:.6g} +- {result['trace_stderr']:.2g} "
              f"({args.trace_samples} Hutchinson samples)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
