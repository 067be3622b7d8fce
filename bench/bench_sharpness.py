"""Sharpness measurement cost: Lanczos vs power iteration (PyHessian's method), side by side.

On the same model and data: the Hessian-vector products (HVPs) each method needs before its
top-k estimates are within 1e-3 (relative) of the converged values, for k = 1 and k = 5; and
the time of one HVP relative to one forward + backward pass on the same batches.

    python bench/bench_sharpness.py [--model small_cnn] [--samples 512] [--train-epochs 2]
                                    [--train-subset N] [--device cpu|cuda] [--hvp-only] [--save]

The model is trained first with samfast-train into runs/bench_sharpness/<model> under the
working directory, replacing what an earlier run left there (--overwrite).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samfast  # noqa: E402
from common import environment, markdown_table, median, write_results  # noqa: E402
from samfast.cifar import train as trainer  # noqa: E402
from samfast.cifar.data import eval_batches, load_cifar, stratified_subset  # noqa: E402
from samfast.cifar.demo import DEMO_DATA  # noqa: E402
from samfast.sharpness import _HessianOperator, _measurement_mode  # noqa: E402


def first_within(history: list, truth: torch.Tensor, rel: float) -> int | None:
    """1-based index of the first Ritz-value list whose top-k are all within ``rel``."""
    for i, values in enumerate(history, 1):
        if len(values) >= len(truth) and all(
                abs(v - float(t)) <= rel * abs(float(t)) for v, t in zip(values, truth)):
            return i
    return None


def lanczos_vs_power(model, batches):
    truth = samfast.hessian_eigenvalues(model, F.cross_entropy, batches, k=5, max_iter=120,
                                        tol=1e-10)
    rows, raw = [], {"truth": truth.tolist()}
    for k in (1, 5):
        _, info_l = samfast.hessian_eigenvalues(model, F.cross_entropy, batches, k=k,
                                                max_iter=120, tol=1e-12, return_info=True)
        lanczos = first_within(info_l.history, truth[:k], 1e-3)
        # Power iteration with deflation, run with PyHessian-like stopping (1e-4 change);
        # its HVPs to 1e-3 are counted from its own iterate history, eigenvalue by eigenvalue.
        values, _, info_p = samfast.hessian_eigenvalues(
            model, F.cross_entropy, batches, k=k, method="power", max_iter=300, tol=1e-4,
            return_eigenvectors=True, return_info=True)
        error = float(((values - truth[:k]).abs() / truth[:k].abs()).max())
        rows.append([k, lanczos, info_p.hvps, f"{error:.1e}",
                     f"{info_p.hvps / lanczos:.1f}x" if lanczos else "n/a"])
        raw[f"k{k}"] = {"lanczos_history": info_l.history, "power_history": info_p.history,
                        "power_values": values.tolist()}
    table = markdown_table(["k", "Lanczos HVPs to 1e-3", "power-iteration HVPs (stop at 1e-4 "
                            "change)", "power max rel. error", "power / Lanczos"], rows)
    return table, raw, truth


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--train-epochs", type=int, default=2,
                    help="train the model briefly first (a random init has a boring Hessian)")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="train on this many of the embedded images (default: all 2500)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hvp-only", action="store_true",
                    help="only the HVP vs forward+backward timing (no Lanczos/power runs)")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    out = Path("runs/bench_sharpness") / args.model
    subset = ["--train-subset", str(args.train_subset)] if args.train_subset else []
    cfg = trainer.parse_config(["--data-dir", str(DEMO_DATA), "--model", args.model,
                                "--epochs", str(args.train_epochs), "--optimizer", "sgd",
                                "--out", str(out), "--overwrite", "--quiet",
                                "--device", args.device, *subset])
    trainer.run(cfg)
    model = trainer.build_model(args.model, 10).to(device)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True,
                                     map_location=device)["model"])
    train, _ = load_cifar(str(DEMO_DATA))
    batches = [(x.to(device), y.to(device)) for x, y in
               eval_batches(stratified_subset(train, args.samples, seed=1), 256)]

    table, raw, truth = "(Lanczos vs power iteration: not run, --hvp-only)", {}, None
    if not args.hvp_only:
        table, raw, truth = lanczos_vs_power(model, batches)

    # One HVP against one forward + backward on the same batches, interleaved: as samfast
    # computes it by default (gradient graph kept between products, eval BatchNorm in its
    # affine form), and the plain double backward (graph rebuilt for every product, PyTorch's
    # batch-norm double backward) that the defaults replace.
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)

    def fwd_bwd():
        for x, y in batches:
            loss = F.cross_entropy(model(x), y) * len(y) / total
            torch.autograd.grad(loss, params)
    model.eval()
    plain = _HessianOperator(model, F.cross_entropy, batches, cache_graph=False)
    with _measurement_mode(model, "eval"):
        cached = _HessianOperator(model, F.cross_entropy, batches, cache_graph=True)
        rebuilt = _HessianOperator(model, F.cross_entropy, batches, cache_graph=False)
        v = torch.randn(cached.numel, dtype=torch.float64).to(device)
        t0 = time.perf_counter()
        cached(v)  # builds and keeps the graphs
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        build_s = time.perf_counter() - t0
    fns = {"forward+backward": fwd_bwd, "HVP (samfast default)": lambda: cached(v),
           "HVP, graph rebuilt": lambda: rebuilt(v), "HVP, plain double backward": lambda: plain(v)}
    times = {name: [] for name in fns}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(args.rounds):
        for name, fn in fns.items():
            patch = (_measurement_mode(model, "eval") if name in ("HVP (samfast default)",
                                                                   "HVP, graph rebuilt")
                     else contextlib.nullcontext())
            with patch:
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    fb = median(times["forward+backward"])
    hvp_rows = [[name, median(t) * 1e3, median(t) / fb] for name, t in times.items()]
    hvp_table = markdown_table(["", "median ms", "x forward+backward"], hvp_rows)
    ratio = median(times["HVP (samfast default)"]) / fb
    text = (f"{args.model} ({cached.numel} params) trained {args.train_epochs} epochs on the "
            f"embedded CIFAR-10 subset{f' ({args.train_subset} images)' if subset else ''}, "
            f"{device.type}; Hessian of the mean cross-entropy on {args.samples} "
            f"training images, BatchNorm in eval mode. Converged top-5: "
            f"{', '.join(f'{t:.4g}' for t in truth.tolist()) if truth is not None else 'n/a'}"
            f"\n\n{table}\n\n"
            f"One Hessian-vector product vs one forward+backward (median of {args.rounds}, "
            f"interleaved; the kept graphs took {build_s * 1e3:.0f} ms to build once, "
            f"{cached.graph_bytes / 2**20 * len(batches):.0f} MiB):\n\n{hvp_table}\n\n"
            f"ratio {ratio:.2f}")
    print(text)
    raw.update(times_s=times, graph_build_s=build_s)
    if args.save:
        print("wrote", write_results(f"sharpness-{args.model}", env, text, raw, None))


if __name__ == "__main__":
    main()
