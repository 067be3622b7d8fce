"""samfast-train: the CIFAR reference trainer, with SAM switched on late (or early).

    samfast-train --data-dir DIR --model wrn16_8 --epochs 200 --optimizer sam --sam-start 175

trains 175 epochs of SGD then 25 of SAM (Zhou et al., ICLR 2025, Figure 1). Everything it
measures goes to ``--out``: ``metrics.jsonl`` (one line per epoch), ``summary.json``,
``curves.png`` and the checkpoint ``last.pt`` (atomic; ``--resume`` continues from it and, on
the CPU with ``--deterministic``, ends bit-identical to an uninterrupted run).

Sections: configuration / set-up / one epoch / evaluation / checkpoints / logging / main.
Epoch times count training only (evaluation and checkpoints excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import samfast
from samfast.distributed import sam_step
from samfast.cifar.data import (NUM_CLASSES, DataError, epoch_generator, eval_batches,
                                find_data_dir, load_cifar, stratified_subset, train_batches)
from samfast.cifar.models import MODELS, build_model

# =============================================================================================
# configuration
# =============================================================================================

OPTIMIZERS = ("sgd", "sam", "asam", "usam")
LR_SCHEDULES = ("step_wrn", "multistep", "cosine")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samfast-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar10")
    d.add_argument("--data-dir", default=None,
                   help="train_*.npz + test.npz, or the official python folders "
                        "(default: $SAMFAST_DATA, else the --download cache)")
    d.add_argument("--download", action="store_true", help="download with torchvision")
    d.add_argument("--train-subset", type=int, default=None,
                   help="train on a stratified subset of N images")
    d.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on a stratified subset of N test images")
    d.add_argument("--cutout", type=int, default=0, help="cutout square size (0: off)")
    m = p.add_argument_group("model and optimization")
    m.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    m.add_argument("--epochs", type=int, default=10)
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--lr", type=float, default=0.1)
    m.add_argument("--momentum", type=float, default=0.9)
    m.add_argument("--weight-decay", type=float, default=5e-4)
    m.add_argument("--nesterov", action="store_true")
    m.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="step_wrn",
                   help="step_wrn: x0.2 at 30/60/80%% of the epochs; multistep: x0.1 at "
                        "50/75%%; cosine: to 0")
    m.add_argument("--label-smoothing", type=float, default=0.0)
    s = p.add_argument_group("SAM and its schedule")
    s.add_argument("--optimizer", choices=OPTIMIZERS, default="sam")
    s.add_argument("--rho", type=float, default=None,
                   help="neighbourhood radius (default 0.05; 2.0 for asam)")
    s.add_argument("--eta", type=float, default=0.0, help="ASAM's eta")
    s.add_argument("--sam-start", type=int, default=0,
                   help="first SAM epoch (0-based): epochs before it use SGD")
    s.add_argument("--sam-end", type=int, default=None,
                   help="SAM only before this epoch (SAM -> SGD); default: until the end")
    s.add_argument("--reset-momentum", action="store_true",
                   help="clear the momentum buffers when SAM switches on or off")
    s.add_argument("--ddp-ascent", choices=("global", "local"), default="global",
                   help="under torchrun: all-reduce the ascent gradient (global) or perturb "
                        "each replica with its own (local, m-sharpness)")
    s.add_argument("--backend", default="auto", help="samfast backend (auto, reference, native, "
                                                     "triton)")
    h = p.add_argument_group("sharpness (top Hessian eigenvalue of the training loss)")
    h.add_argument("--sharpness-every", type=int, default=0,
                   help="measure every N epochs and at the end (0: never)")
    h.add_argument("--sharpness-samples", type=int, default=1024,
                   help="on this fixed stratified subset of the training images")
    h.add_argument("--sharpness-k", type=int, default=1, help="how many top eigenvalues")
    h.add_argument("--sharpness-iters", type=int, default=20, help="Lanczos iterations at most")
    a = p.add_argument_group("adversarial training (PGD) and robust evaluation")
    a.add_argument("--adv-start", type=int, default=None,
                   help="first epoch of PGD adversarial training (default: none)")
    a.add_argument("--adv-end", type=int, default=None,
                   help="adversarial training only before this epoch")
    a.add_argument("--adv-eps", type=_pixels, default=8 / 255,
                   help="radius in pixels of [0, 1]; '8/255' accepted")
    a.add_argument("--adv-alpha", type=_pixels, default=2 / 255, help="PGD step size")
    a.add_argument("--adv-steps", type=int, default=10, help="PGD steps in training")
    a.add_argument("--adv-norm", choices=("linf", "l2"), default="linf")
    a.add_argument("--eval-robust-every", type=int, default=0,
                   help="robust accuracy every N epochs and at the end (0: never)")
    a.add_argument("--eval-pgd-steps", type=int, default=20)
    a.add_argument("--eval-robust-samples", type=int, default=500,
                   help="on this fixed stratified subset of the test images")
    r = p.add_argument_group("run")
    r.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    r.add_argument("--channels-last", action="store_true")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-identical resume on the CPU)")
    r.add_argument("--out", default="runs/latest")
    r.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    r.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    r.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    r.add_argument("--eval-batch-size", type=int, default=500)
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _pixels(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from exc


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every flag checked before any work; the error names the flag."""
    def bad(flag: str, why: str) -> None:
        parser.error(f"argument {flag}: {why}")

    if args.epochs < 1:
        bad("--epochs", f"must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        bad("--batch-size", f"must be >= 1, got {args.batch_size}")
    for flag, value in (("--lr", args.lr), ("--momentum", args.momentum),
                        ("--weight-decay", args.weight_decay), ("--eta", args.eta)):
        if not math.isfinite(value) or value < 0:
            bad(flag, f"must be a finite number >= 0, got {value}")
    if args.lr == 0:
        bad("--lr", "must be > 0")
    if args.rho is not None and (not math.isfinite(args.rho) or args.rho < 0):
        bad("--rho", f"must be a finite number >= 0, got {args.rho}")
    if not 0 <= args.label_smoothing < 1:
        bad("--label-smoothing", f"must be in [0, 1), got {args.label_smoothing}")
    if args.cutout < 0 or args.cutout > 32:
        bad("--cutout", f"must be in 0..32, got {args.cutout}")
    if not 0 <= args.sam_start <= args.epochs:
        bad("--sam-start", f"must be in 0..{args.epochs} (--epochs), got {args.sam_start}")
    if args.sam_end is not None and not args.sam_start <= args.sam_end <= args.epochs:
        bad("--sam-end", f"must be in {args.sam_start}..{args.epochs}, got {args.sam_end}")
    for flag, value in (("--train-subset", args.train_subset),
                        ("--test-subset", args.test_subset)):
        if value is not None and value < 10:
            bad(flag, f"must be >= 10 (one image per class at least), got {value}")
    if args.adv_start is not None and not 0 <= args.adv_start <= args.epochs:
        bad("--adv-start", f"must be in 0..{args.epochs} (--epochs), got {args.adv_start}")
    if args.adv_end is not None:
        if args.adv_start is None:
            bad("--adv-end", "needs --adv-start")
        if not args.adv_start <= args.adv_end <= args.epochs:
            bad("--adv-end", f"must be in {args.adv_start}..{args.epochs}, got {args.adv_end}")
    for flag, value in (("--adv-eps", args.adv_eps), ("--adv-alpha", args.adv_alpha)):
        if not math.isfinite(value) or value < 0:
            bad(flag, f"must be a finite number >= 0, got {value}")
    for flag, value in (("--adv-steps", args.adv_steps), ("--eval-pgd-steps", args.eval_pgd_steps),
                        ("--eval-robust-every", args.eval_robust_every)):
        if value < 0:
            bad(flag, f"must be >= 0, got {value}")
    if args.eval_robust_samples < 10:
        bad("--eval-robust-samples", f"must be >= 10, got {args.eval_robust_samples}")
    if args.sharpness_every < 0:
        bad("--sharpness-every", f"must be >= 0, got {args.sharpness_every}")
    for flag, value in (("--sharpness-samples", args.sharpness_samples),
                        ("--sharpness-k", args.sharpness_k),
                        ("--sharpness-iters", args.sharpness_iters)):
        if value < 1:
            bad(flag, f"must be >= 1, got {value}")
    for flag, value in (("--checkpoint-every", args.checkpoint_every),
                        ("--eval-every", args.eval_every),
                        ("--eval-batch-size", args.eval_batch_size)):
        if value < 1:
            bad(flag, f"must be >= 1, got {value}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        bad("--device", f"{args.device} requested but CUDA is not available")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        bad("--device", str(exc))
    if args.amp == "fp16" and args.ddp_ascent == "local" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        bad("--amp", "fp16 loss scaling with --ddp-ascent local is not supported yet; use "
                     "--amp bf16 or --ddp-ascent global")
    device = torch.device(args.device)
    if args.backend not in samfast.available_backends(device) and args.backend != "auto":
        bad("--backend", f"{args.backend!r} is not available on {device} (available: "
                         f"{', '.join(samfast.available_backends(device))})")


def parse_config(argv=None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    if args.rho is None:
        args.rho = 2.0 if args.optimizer == "asam" else 0.05
    return vars(args)


def make_schedule(cfg: dict) -> samfast.SwitchSchedule:
    sam = cfg["optimizer"] != "sgd"
    return samfast.SwitchSchedule(
        cfg["epochs"], sam_start=cfg["sam_start"] if sam else None,
        sam_end=cfg["sam_end"] if sam else None,
        adv_start=cfg.get("adv_start"), adv_end=cfg.get("adv_end"),
        reset_momentum=cfg["reset_momentum"])


def lr_factor(schedule: str, epochs: int):
    """Multiplier of the base lr for each (0-based) epoch."""
    if schedule == "step_wrn":
        marks = [math.floor(epochs * f) for f in (0.3, 0.6, 0.8)]
        return lambda e: 0.2 ** sum(e >= m for m in marks)
    if schedule == "multistep":
        marks = [math.floor(epochs * f) for f in (0.5, 0.75)]
        return lambda e: 0.1 ** sum(e >= m for m in marks)
    return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))


# =============================================================================================
# set-up
# =============================================================================================

def setup_determinism(cfg: dict) -> None:
    torch.manual_seed(cfg["seed"])
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(cfg: dict, model: torch.nn.Module) -> samfast.SAM:
    """A samfast.SAM in every case: with --optimizer sgd it simply never enables SAM, so the
    SGD phase of every run goes through the same code (SAM.base_step)."""
    return samfast.SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=cfg["rho"],
                       adaptive=cfg["optimizer"] == "asam", eta=cfg["eta"],
                       normalize=cfg["optimizer"] != "usam", backend=cfg["backend"],
                       lr=cfg["lr"], momentum=cfg["momentum"],
                       weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])


def load_data(cfg: dict, device: torch.device):
    train, test = load_cifar(find_data_dir(cfg["data_dir"]), cfg["dataset"], cfg["download"])
    if cfg["train_subset"]:
        if cfg["train_subset"] > len(train):
            raise DataError(f"--train-subset {cfg['train_subset']} > {len(train)} images")
        train = stratified_subset(train, cfg["train_subset"], seed=cfg["seed"])
    if cfg["test_subset"]:
        if cfg["test_subset"] > len(test):
            raise DataError(f"--test-subset {cfg['test_subset']} > {len(test)} images")
        test = stratified_subset(test, cfg["test_subset"], seed=cfg["seed"])
    return train.to(device), test.to(device)


def autocast(cfg: dict, device: torch.device):
    if cfg["amp"] == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg["amp"] == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =============================================================================================
# one epoch
# =============================================================================================

def train_epoch(cfg, epoch, model, opt, train, device, scaler=None, progress=None,
                perturb_inputs=None, step_model=None, rank=0, world=1):
    """One epoch; returns (mean train loss, train accuracy %, seconds, images), over all
    ranks. ``model`` runs the forward (maybe compiled); ``step_model`` (the DDP wrapper, or
    the model) decides the SAM step's all-reduce semantics (samfast.distributed.sam_step)."""
    model.train()
    step_model = step_model if step_model is not None else model
    gen = epoch_generator(cfg["seed"], epoch)
    if world > 1:  # same global batches on every rank, a different shard and augmentation
        gen = torch.Generator().manual_seed(gen.initial_seed() * world + rank)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    _sync(device)
    t0 = time.perf_counter()
    order_gen = epoch_generator(cfg["seed"], epoch) if world > 1 else None
    for x, y in train_batches(train, cfg["batch_size"], gen, cfg["cutout"], rank=rank,
                              world=world, order_generator=order_gen):
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if perturb_inputs is not None:
            x = perturb_inputs(model, x, y)
        first_logits = []

        def loss_fn():
            with autocast(cfg, device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg["label_smoothing"])
            if not first_logits:
                first_logits.append(logits.detach())
            return loss

        loss = sam_step(step_model, opt, loss_fn, ascent=cfg["ddp_ascent"], grad_scaler=scaler)
        total_loss += loss.detach() * len(y)
        correct += (first_logits[0].argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress.update(1)
            if progress.n % 10 == 0 or progress.n == progress.total:
                elapsed = time.perf_counter() - t0
                progress.set_postfix(loss=f"{float(total_loss) / float(seen):.3f}",
                                     acc=f"{100 * float(correct) / float(seen):.1f}",
                                     img_s=f"{world * float(seen) / max(elapsed, 1e-9):.0f}")
    if world > 1:
        totals = torch.stack([total_loss.double(), correct.double(), seen.double()])
        dist.all_reduce(totals)
        total_loss, correct, seen = totals
    _sync(device)
    seconds = time.perf_counter() - t0
    n = float(seen)
    return float(total_loss) / n, 100.0 * float(correct) / n, seconds, int(n)


# =============================================================================================
# evaluation
# =============================================================================================

@torch.no_grad()
def evaluate(cfg, model, split, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy %) on ``split``, BatchNorm in eval mode."""
    was_training = model.training
    model.eval()
    total, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in eval_batches(split, cfg["eval_batch_size"]):
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, device):
            logits = model(x).float()
        total += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return float(total) / len(split), 100.0 * float(correct) / len(split)


def sharpness_batches(cfg: dict, train) -> list:
    """A fixed stratified subset of the (unaugmented) training images, in eval batches."""
    n = min(cfg["sharpness_samples"], len(train))
    subset = stratified_subset(train, n, seed=cfg["seed"] + 1) if n < len(train) else train
    return list(eval_batches(subset, cfg["eval_batch_size"]))


def measure_sharpness(cfg: dict, model, batches) -> dict:
    """Top eigenvalues of the Hessian of the mean cross-entropy (no label smoothing), with
    BatchNorm in eval mode; see samfast.sharpness."""
    eigs, info = samfast.hessian_eigenvalues(
        model, F.cross_entropy, batches, k=cfg["sharpness_k"], max_iter=cfg["sharpness_iters"],
        tol=1e-3, seed=cfg["seed"], return_info=True)
    return {"sharpness": float(eigs[0]), "hessian_top": eigs.tolist(),
            "sharpness_hvps": info.hvps}


def adversarial_inputs(cfg: dict, epoch: int):
    """x -> PGD examples for adversarial training, with a random start drawn from a
    generator of (seed, epoch): a resumed epoch attacks exactly as the uninterrupted one."""
    gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch + 500_009)

    def perturb(model, x, y):
        with autocast(cfg, x.device):
            return samfast.pgd_attack(model, x, y, eps=cfg["adv_eps"], alpha=cfg["adv_alpha"],
                                      steps=cfg["adv_steps"], norm=cfg["adv_norm"],
                                      generator=gen)
    return perturb


def robust_eval(cfg: dict, test):
    """model -> PGD-k accuracy (%) on a fixed stratified subset of the test set."""
    n = min(cfg["eval_robust_samples"], len(test))
    subset = stratified_subset(test, n, seed=cfg["seed"] + 2) if n < len(test) else test
    batches = list(eval_batches(subset, cfg["eval_batch_size"]))

    def evaluate_robust(model) -> float:
        return samfast.robust_accuracy(model, batches, eps=cfg["adv_eps"],
                                       alpha=cfg["adv_alpha"], steps=cfg["eval_pgd_steps"],
                                       norm=cfg["adv_norm"], seed=cfg["seed"])
    return evaluate_robust


# =============================================================================================
# checkpoints
# =============================================================================================

def atomic_write_bytes(path: Path, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename over it: a
    reader (or a resume after SIGKILL) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_checkpoint(path: Path, cfg, model, opt, lr_sched, next_epoch, history, wall) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "lr_scheduler": lr_sched.state_dict(), "epoch": next_epoch, "config": cfg,
             "history": history, "wall_time_s": wall, "torch_rng": torch.get_rng_state(),
             "format": 1}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


# Settings that must match for --resume to continue the same run.
_RESUME_KEYS = ("dataset", "model", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                "ddp_ascent",
                "nesterov", "lr_schedule", "label_smoothing", "cutout", "optimizer", "rho",
                "eta", "sam_start", "sam_end", "reset_momentum", "seed", "train_subset", "amp",
                "adv_start", "adv_end", "adv_eps", "adv_alpha", "adv_steps", "adv_norm")


def load_checkpoint(path: Path, cfg) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    old = ckpt["config"]
    changed = [k for k in _RESUME_KEYS if old.get(k) != cfg.get(k)]
    if changed:
        raise SystemExit(f"samfast-train: --resume: {path} was written with different settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {old.get(k)} (now {cfg.get(k)})"
                                     for k in changed))
    return ckpt


# =============================================================================================
# logging
# =============================================================================================

def versions(device: torch.device) -> dict:
    return {"samfast": samfast.__version__, "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"}


def write_metrics(out: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write_bytes(out / "metrics.jsonl", lambda f: f.write(text.encode()))


def plot_curves(path: Path, history: list[dict], schedule: samfast.SwitchSchedule,
                title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    evals = [r for r in history if r.get("test_loss") is not None]
    ax_loss.plot([r["epoch"] + 1 for r in evals], [r["test_loss"] for r in evals], label="test")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax_acc.plot([r["epoch"] + 1 for r in evals], [r["test_acc"] for r in evals], label="test")
    if "robust_acc" in (evals[0] if evals else {}):
        ax_acc.plot([r["epoch"] + 1 for r in evals if r.get("robust_acc") is not None],
                    [r["robust_acc"] for r in evals if r.get("robust_acc") is not None],
                    label="test (PGD)")
    for e in range(1, schedule.epochs):
        if schedule.switches_at(e) or (schedule.adversarial_at(e) != schedule.adversarial_at(e - 1)):
            for ax in (ax_loss, ax_acc):
                ax.axvline(e + 0.5, color="gray", ls="--", lw=1)
            ax_acc.annotate(schedule.phase(e), (e + 0.5, ax_acc.get_ylim()[0]), fontsize=8,
                            color="gray", rotation=90, va="bottom")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================
# main
# =============================================================================================

def init_distributed(cfg: dict) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1): one process group, NCCL
    on CUDA (one GPU per local rank), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg["device"])
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run(cfg: dict) -> dict:
    """Train as configured; returns the summary (also written to OUT/summary.json). Under
    torchrun every rank trains its shard of each batch; rank 0 alone evaluates, logs and
    writes checkpoints (the others wait for it at the next all-reduce)."""
    rank, world, device = init_distributed(cfg)
    lead = rank == 0
    out = Path(cfg["out"])
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    setup_determinism(cfg)
    train, test = load_data(cfg, device)
    model = build_model(cfg["model"], NUM_CLASSES[cfg["dataset"]], cfg["dataset"]).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    schedule = make_schedule(cfg)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg["lr_schedule"], cfg["epochs"]))
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    step_model = DistributedDataParallel(model) if world > 1 else model
    forward_model = torch.compile(step_model) if cfg["compile"] else step_model

    start_epoch, history, wall_before = 0, [], 0.0
    ckpt_path = out / "last.pt"
    if world > 1:
        dist.barrier()  # rank 0 made the output folder
    if cfg["resume"] and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, history, wall_before = ckpt["epoch"], ckpt["history"], ckpt["wall_time_s"]
        if lead:
            print(f"resuming {ckpt_path} at epoch {start_epoch}", file=sys.stderr)
    elif cfg["resume"] and lead:
        print(f"--resume: no {ckpt_path} yet, starting from scratch", file=sys.stderr)

    extra_eval = robust_eval(cfg, test) if cfg["eval_robust_every"] else None
    sharp_batches = sharpness_batches(cfg, train) if cfg["sharpness_every"] else None
    t_run = time.perf_counter()
    from tqdm.auto import tqdm
    steps = math.ceil(len(train) / cfg["batch_size"])
    for epoch in range(start_epoch, cfg["epochs"]):
        schedule.apply(opt, epoch)
        lr = opt.param_groups[0]["lr"]
        progress = None if (cfg["quiet"] or not lead) else tqdm(
            total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']} [{schedule.phase(epoch)}]",
            unit="batch", leave=False, disable=None)
        adv = adversarial_inputs(cfg, epoch) if schedule.adversarial_at(epoch) else None
        train_loss, train_acc, seconds, _ = train_epoch(cfg, epoch, forward_model, opt, train,
                                                       device, scaler, progress, adv,
                                                       step_model, rank, world)
        if progress is not None:
            progress.close()
        lr_sched.step()
        row = {"epoch": epoch, "phase": schedule.phase(epoch), "lr": lr,
               "train_loss": train_loss, "train_acc": train_acc, "epoch_time_s": seconds,
               "test_loss": None, "test_acc": None}
        last = epoch == cfg["epochs"] - 1
        if not lead:
            continue
        if last or (epoch + 1) % cfg["eval_every"] == 0:
            row["test_loss"], row["test_acc"] = evaluate(cfg, model, test, device)
        if extra_eval is not None and (last or (epoch + 1) % cfg["eval_robust_every"] == 0):
            row["robust_acc"] = extra_eval(model)
        if sharp_batches is not None and (last or (epoch + 1) % cfg["sharpness_every"] == 0):
            row.update(measure_sharpness(cfg, model, sharp_batches))
        history.append(row)
        write_metrics(out, history)
        if not cfg["quiet"]:
            scores = "" if row["test_acc"] is None else \
                f" test loss {row['test_loss']:.3f} acc {row['test_acc']:.2f}%"
            print(f"epoch {epoch + 1:3d}/{cfg['epochs']} [{row['phase']}] lr {lr:.4g} "
                  f"train loss {train_loss:.3f} acc {train_acc:.2f}% {seconds:.1f}s{scores}",
                  file=sys.stderr, flush=True)
        if last or (epoch + 1) % cfg["checkpoint_every"] == 0:
            save_checkpoint(ckpt_path, _jsonable(cfg), model, opt, lr_sched, epoch + 1, history,
                            wall_before + time.perf_counter() - t_run)

    if not lead:
        dist.barrier()  # wait for rank 0's last evaluation and files
        return {}
    final = history[-1]
    summary = {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"],
        "train_loss": final["train_loss"], "train_acc": final["train_acc"],
        "epochs": cfg["epochs"], "sam_epochs": schedule.sam_epochs,
        "adversarial_epochs": schedule.adversarial_epochs,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "wall_time_s": wall_before + time.perf_counter() - t_run,
        "skipped_steps": opt.skipped_steps, "backend": opt.backend, "world_size": world,
        "config": _jsonable(cfg), "versions": versions(device),
    }
    for key in ("robust_acc", "sharpness", "hessian_top"):
        if key in final:
            summary[key] = final[key]
    atomic_write_bytes(out / "summary.json",
                       lambda f: f.write(json.dumps(summary, indent=1).encode()))
    plot_curves(out / "curves.png", history, schedule,
                f"{cfg['model']} on {cfg['dataset']}, {cfg['optimizer']} "
                f"(SAM epochs {schedule.sam_epochs}/{cfg['epochs']})")
    if world > 1:
        dist.barrier()  # the other ranks wait here for rank 0's files
    return summary


def _jsonable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, type(None)))}


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        summary = run(cfg)
    except DataError as exc:
        print(f"samfast-train: data error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if summary:  # rank 0
        print(json.dumps({k: summary[k] for k in ("test_acc", "test_loss", "train_loss",
                                                  "epochs", "sam_epochs", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
