"""Why LookSAM at the paper's alpha = 0.7 did not train in the small CPU regime (issue #17).

An independent loop of LookSAM's Algorithm 1 (Liu et al., CVPR 2022) over torch.optim.SGD,
with whole-model vectors and no samfast optimizer code, on the efficient experiment's data
and model (2,500 CIFAR-10 images, small_cnn_w48, lr 0.1, momentum 0.9, wd 5e-4, label
smoothing 0.1, rho 0.05, k = 4), for each alpha: the train loss and accuracy per epoch, and on
every full (SAM) step ||g_v|| / ||g||, the size of SAM's own orthogonal part that the reuse
steps replace by alpha ||g||. (tests/test_policies.py checks that samfast's LookSAM through
the trainer's sam_step equals this loop to 1e-10.)

    python bench/bench_looksam_alpha.py --data-dir ../shared/data/cifar10 --save
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402
from samfast.cifar.data import epoch_generator, load_cifar, stratified_subset, train_batches  # noqa: E402,E501
from samfast.cifar.models import build_model  # noqa: E402


def run(train, alpha: float, k: int, epochs: int, seed: int = 0) -> dict:
    """One LookSAM run by hand; per-epoch (loss, accuracy) and the full steps' ratios."""
    torch.manual_seed(seed)
    model = build_model("small_cnn_w48").train()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def loss_of(x, y):
        return F.cross_entropy(model(x), y, label_smoothing=0.1)

    def grads():
        return [p.grad.detach().clone() for p in params]

    def dot(a, b):
        return sum((u.double() * v.double()).sum() for u, v in zip(a, b))

    gv, t, epochs_out, ratios = None, 0, [], []
    for epoch in range(epochs):
        total = correct = seen = 0
        for x, y in train_batches(train, 128, epoch_generator(seed, epoch), 0,
                                  augmentation="none"):
            base.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            loss.backward()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            g = grads()
            if t % k == 0:  # the full step: ascend, g_s, restore, store g_v
                scale = 0.05 / dot(g, g).sqrt()
                e = [(scale * gi).to(gi.dtype) for gi in g]
                with torch.no_grad():
                    for p, ei in zip(params, e):
                        p.add_(ei)
                base.zero_grad(set_to_none=True)
                for m in bns:
                    m.track_running_stats = False
                loss_of(x, y).backward()
                for m in bns:
                    m.track_running_stats = True
                with torch.no_grad():
                    for p, ei in zip(params, e):
                        p.sub_(ei)
                gs = grads()
                coef = dot(g, gs) / dot(g, g)
                gv = [s - (coef * gi).to(gi.dtype) for s, gi in zip(gs, g)]
                ratios.append(float(dot(gv, gv).sqrt() / dot(g, g).sqrt()))
                update = gs
            else:  # a reuse step: g + alpha ||g|| / ||g_v|| g_v
                coef = alpha * dot(g, g).sqrt() / dot(gv, gv).sqrt()
                update = [gi + (coef * v).to(gi.dtype) for gi, v in zip(g, gv)]
            for p, u in zip(params, update):
                p.grad = u
            base.step()
            t += 1
        epochs_out.append({"epoch": epoch, "train_loss": total / seen,
                           "train_acc": 100.0 * correct / seen})
        print(f"alpha {alpha:g} epoch {epoch}: loss {total / seen:.4f} "
              f"acc {100.0 * correct / seen:.2f}", flush=True)
    return {"alpha": alpha, "epochs": epochs_out, "gv_over_g": ratios}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.7])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    env = environment(torch.device("cpu"))
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    train, _ = load_cifar(args.data_dir)
    train = stratified_subset(train, 2500, 0)
    results = [run(train, a, args.k, args.epochs) for a in args.alphas]
    headers = ["alpha"] + [f"epoch {e} loss / acc" for e in range(args.epochs)] + [
        "norm(g_v) / norm(g) on full steps: median [min, max]"]
    rows = []
    for r in results:
        q = r["gv_over_g"]
        rows.append([f"{r['alpha']:g}"] + [f"{e['train_loss']:.3f} / {e['train_acc']:.1f}%"
                                           for e in r["epochs"]]
                    + [f"{statistics.median(q):.3f} [{min(q):.3f}, {max(q):.3f}]"])
    md = (f"LookSAM by hand (Algorithm 1, torch.optim.SGD), k = {args.k}, {args.epochs} epochs of "
          "the efficient experiment's regime (2,500 CIFAR-10 images, small_cnn_w48, lr 0.1, "
          "momentum 0.9, wd 5e-4, label smoothing 0.1, rho 0.05). alpha 0 is SAM every k "
          "steps. The reuse steps add alpha norm(g) along g_v, so alpha / (norm(g_v) / norm(g)) "
          "is how much harder than SAM's own orthogonal part they push.\n\n"
          + markdown_table(headers, rows))
    print(md)
    if args.save:
        print("wrote", write_results("looksam_alpha", env, md, {"runs": results}, None))


if __name__ == "__main__":
    main()
