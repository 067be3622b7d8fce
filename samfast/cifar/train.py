"""samfast-train: the CIFAR reference trainer, with SAM switched on late (or early).

    samfast-train --data-dir DIR --model wrn16_8 --epochs 200 --optimizer sam --sam-start 175

trains 175 epochs of SGD then 25 of SAM (Zhou et al., ICLR 2025, Figure 1). Everything it
measures goes to ``--out``: ``metrics.jsonl`` (one line per epoch), ``summary.json``,
``curves.png`` and the checkpoint ``last.pt`` (atomic; ``--resume`` continues from it and, on
the CPU with ``--deterministic``, ends bit-identical to an uninterrupted run).

A run directory holds one run: an existing one is continued (``--resume``, only with the
same settings and data) or replaced (``--overwrite``), never mixed into. ``--snapshot-epochs
K`` keeps ``epoch_K.pt``, the state at the start of epoch K, and ``--fork-from DIR
--fork-epoch K`` starts another run from it when the first K epochs would have been trained
identically (e.g. SGD -> SAM at K forked from the SGD run: the paired design). The fork's
``metrics.jsonl`` starts with the source's K rows, marked ``"inherited": true``; its summary
names the snapshot, and its times include the inherited epochs'.

``--sam-policy`` chooses which steps of the SAM epochs run SAM (samfast/policies.py); every
epoch's row logs the fraction that did and what the epoch cost: forward + backward passes,
the optimizer's own time, and both together in SGD-step equivalents (see ``epoch_cost``).

Under torchrun every rank trains its shard of each batch, with DDP or, with ``--fsdp``, on an
FSDP2 model (each residual block one unit); its checkpoints hold the full tensors, gathered
from every rank, so they are the files a run without FSDP writes.

Sections: configuration / set-up / one epoch / evaluation / run directory and checkpoints /
logging / main. Epoch times count training only (evaluation and checkpoints excluded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import platform
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import samfast
from samfast.distributed import sam_step, unwrap
from samfast.cifar.config import (ConfigError, RunConfig, fork_problems, identity_changes,
                                  parse_config, run_identity, snapshot_path)
from samfast.cifar.data import (NUM_CLASSES, DataError, Split, epoch_generator, eval_batches,
                                find_data_dir, fingerprint, load_cifar, stratified_subset,
                                train_batches)
from samfast.cifar.models import build_model

# =============================================================================================
# configuration (the fields, flags and checks live in samfast.cifar.config)
# =============================================================================================


class RunError(RuntimeError):
    """A run directory, checkpoint or snapshot that cannot be used as asked."""


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

def setup_determinism(cfg: RunConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(cfg: RunConfig, model: torch.nn.Module,
                    steps_per_epoch: int = 1) -> samfast.SAM:
    """A samfast.SAM in every case: with --optimizer sgd it simply never enables SAM, so the
    SGD phase of every run goes through the same code (SAM.base_step). Its policy is
    --sam-policy's (none for switch)."""
    return samfast.SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=cfg.rho,
                       adaptive=cfg.optimizer == "asam", eta=cfg.eta,
                       normalize=cfg.optimizer != "usam", backend=cfg.backend,
                       policy=cfg.policy(steps_per_epoch),
                       lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def select_data(cfg: RunConfig, train: Split, test: Split) -> tuple[Split, Split]:
    """The subsets of the loaded data that the run uses."""
    for name, split, n in (("--train-subset", train, cfg.train_subset),
                           ("--test-subset", test, cfg.test_subset)):
        if n is not None and n > len(split):
            raise DataError(f"{name} {n} > {len(split)} images")
    if cfg.train_subset is not None:
        train = stratified_subset(train, cfg.train_subset, seed=cfg.seed)
    if cfg.test_subset is not None:
        test = stratified_subset(test, cfg.test_subset, seed=cfg.seed)
    return train, test


def data_fingerprint(train: Split, test: Split) -> dict[str, str]:
    return {"train": fingerprint(train), "test": fingerprint(test)}


def load_data(cfg: RunConfig) -> tuple[Split, Split, dict[str, str]]:
    """(train, test, fingerprint) of the data the run uses, on the CPU."""
    train, test = load_cifar(find_data_dir(cfg.data_dir), cfg.dataset, cfg.download)
    train, test = select_data(cfg, train, test)
    return train, test, data_fingerprint(train, test)


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
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
    gen = epoch_generator(cfg.seed, epoch)
    if world > 1:  # same global batches on every rank, a different shard and augmentation
        gen = torch.Generator().manual_seed(gen.initial_seed() * world + rank)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    _sync(device)
    t0 = time.perf_counter()
    order_gen = epoch_generator(cfg.seed, epoch) if world > 1 else None
    for x, y in train_batches(train, cfg.batch_size, gen, cfg.cutout, rank=rank,
                              world=world, order_generator=order_gen,
                              augmentation=cfg.augment):
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if perturb_inputs is not None:
            x = perturb_inputs(model, x, y)
        first_logits = []

        def loss_fn():
            with autocast(cfg, device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not first_logits:
                first_logits.append(logits.detach())
            return loss

        # one pass or two, as the schedule and the optimizer's --sam-policy plan the step
        loss = sam_step(step_model, opt, loss_fn, ascent=cfg.ddp_ascent, grad_scaler=scaler)
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
    for x, y in eval_batches(split, cfg.eval_batch_size):
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, device):
            logits = model(x).float()
        total += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return float(total) / len(split), 100.0 * float(correct) / len(split)


def sharpness_batches(cfg: RunConfig, train) -> list:
    """A fixed stratified subset of the (unaugmented) training images, in eval batches."""
    n = min(cfg.sharpness_samples, len(train))
    subset = stratified_subset(train, n, seed=cfg.seed + 1) if n < len(train) else train
    return list(eval_batches(subset, cfg.eval_batch_size))


def measure_sharpness(cfg: RunConfig, model, batches) -> dict:
    """Top eigenvalues of the Hessian of the mean cross-entropy (no label smoothing), with
    BatchNorm in eval mode; see samfast.sharpness."""
    eigs, info = samfast.hessian_eigenvalues(
        model, F.cross_entropy, batches, k=cfg.sharpness_k, max_iter=cfg.sharpness_iters,
        tol=1e-3, seed=cfg.seed, return_info=True)
    return {"sharpness": float(eigs[0]), "hessian_top": eigs.tolist(),
            "sharpness_hvps": info.hvps}


def adversarial_inputs(cfg: RunConfig, epoch: int):
    """x -> PGD examples for adversarial training, with a random start drawn from a
    generator of (seed, epoch): a resumed epoch attacks exactly as the uninterrupted one."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 500_009)

    def perturb(model, x, y):
        with autocast(cfg, x.device):
            return samfast.pgd_attack(model, x, y, eps=cfg.adv_eps, alpha=cfg.adv_alpha,
                                      steps=cfg.adv_steps, norm=cfg.adv_norm,
                                      generator=gen)
    return perturb


def robust_eval(cfg: RunConfig, test):
    """model -> PGD-k accuracy (%) on a fixed stratified subset of the test set."""
    n = min(cfg.eval_robust_samples, len(test))
    subset = stratified_subset(test, n, seed=cfg.seed + 2) if n < len(test) else test
    batches = list(eval_batches(subset, cfg.eval_batch_size))

    def evaluate_robust(model) -> float:
        return samfast.robust_accuracy(model, batches, eps=cfg.adv_eps,
                                       alpha=cfg.adv_alpha, steps=cfg.eval_pgd_steps,
                                       norm=cfg.adv_norm, seed=cfg.seed)
    return evaluate_robust


# =============================================================================================
# run directory and checkpoints
# =============================================================================================

# Their presence marks a directory as holding a run.
RUN_MARKERS = ("last.pt", "metrics.jsonl", "summary.json")
_SNAPSHOT = re.compile(r"epoch_\d+\.pt")
# What atomic_write_bytes leaves behind when killed between mkstemp and the rename.
_ORPHAN = re.compile(r"\.(last\.pt|metrics\.jsonl|summary\.json|epoch_\d+\.pt)\.[a-z0-9_]{8}")
_CHECKPOINT_KEYS = ("format", "model", "optimizer", "lr_scheduler", "epoch", "config",
                    "data", "world_size", "history", "wall_time_s", "torch_rng")
CHECKPOINT_FORMAT = 2


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _umask() -> int:
    # Reading the umask means setting it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename over it: a
    reader (or a resume after SIGKILL) sees the old file or the new one, never half of one.
    The file gets the mode of any file the user creates (mkstemp's is 0600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_run_dir(cfg: RunConfig) -> list[str]:
    """Refuse (RunError) an --out that cannot be written or holds a run that is neither
    resumed nor overwritten. Returns the run files it holds. Every rank runs it before any
    work: they see the same files and reach the same verdict."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise RunError(f"argument --out: cannot write to {out}: {exc.strerror or exc}") from exc
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    found += sorted(p.name for p in out.iterdir() if _SNAPSHOT.fullmatch(p.name))
    if found and not (cfg.resume or cfg.overwrite):
        raise RunError(f"{out} already holds a run ({', '.join(found)}): pass --resume to "
                       "continue it or --overwrite to replace it")
    if cfg.resume and "summary.json" in found and "last.pt" not in found:
        raise RunError(f"--resume: {out} holds a finished run (summary.json) but no last.pt to "
                       "continue from; pass --overwrite to replace it")
    return found


def clean_run_dir(out: Path, replace: bool) -> None:
    """Remove the temporary files of writes killed half-way and, with ``replace``, the
    outputs of the run being replaced."""
    for p in out.iterdir():
        if _ORPHAN.fullmatch(p.name) or (replace and (
                p.name in RUN_MARKERS or p.name == "curves.png" or _SNAPSHOT.fullmatch(p.name))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def read_checkpoint(path: Path) -> dict:
    """A samfast-train checkpoint from ``path``, or RunError saying why it is not one."""
    # torch.load reads any other file with its legacy unpickler, whose errors on garbage are
    # arbitrary; a torch.save archive is a zip, and a truncated one lacks its directory.
    try:
        is_archive = zipfile.is_zipfile(path)
    except OSError as exc:
        raise RunError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if not is_archive:
        raise RunError(f"{path}: not a checkpoint (not a complete torch.save archive: "
                       "truncated or another file)")
    # Damaged bytes inside the pickle surface as any of these, from torch.load alone.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError,
            pickle.UnpicklingError) as exc:
        # The weights-only unpickler's message advises weights_only=False: not for a file
        # that is damaged or not ours.
        detail = ("UnpicklingError: damaged, or holds more than tensors and plain data"
                  if isinstance(exc, pickle.UnpicklingError) else _first_line(exc))
        raise RunError(f"{path}: not a readable checkpoint ({detail})") from exc
    if not isinstance(ckpt, dict):
        raise RunError(f"{path}: not a samfast-train checkpoint (a {type(ckpt).__name__})")
    if ckpt.get("format") == 1:
        raise RunError(f"{path}: written by an older samfast-train that did not record its "
                       "data, so it cannot be checked to be the same run; pass --overwrite")
    missing = [key for key in _CHECKPOINT_KEYS if key not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise RunError(f"{path}: not a samfast-train checkpoint (missing "
                       f"{', '.join(missing) or 'a config'})")
    return ckpt


def recorded_identity(record: dict, where: Path) -> tuple[RunConfig, dict]:
    """The config and identity that a checkpoint or summary (read from ``where``) records."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunError(f"{where}: records no samfast-train config")
    cfg = RunConfig.from_record(record["config"])
    return cfg, run_identity(cfg, record.get("data"), record.get("world_size", 1))


def check_resume(path: Path, ckpt: dict, cfg: RunConfig, identity: dict) -> None:
    old_cfg, old = recorded_identity(ckpt, path)
    changed = identity_changes(old, identity, old_cfg, cfg)
    if changed:
        raise RunError(f"--resume: {path} was written with other settings: "
                       + "; ".join(changed))


def check_fork(path: Path, ckpt: dict, cfg: RunConfig, identity: dict) -> int:
    """The fork epoch K, after checking that ``ckpt`` is a snapshot at K of a run whose first
    K epochs this run would train identically."""
    epoch = ckpt["epoch"]
    if cfg.fork_epoch is not None and epoch != cfg.fork_epoch:
        raise RunError(f"--fork-from: {path} is the state at epoch {epoch}, not "
                       f"{cfg.fork_epoch} (--fork-epoch)")
    if not 1 <= epoch < cfg.epochs:
        raise RunError(f"--fork-from: {path} is the state at epoch {epoch}; a fork starts at "
                       f"an epoch in 1..{cfg.epochs - 1}")
    src_cfg, src = recorded_identity(ckpt, path)
    problems = fork_problems(src, identity, src_cfg, cfg, epoch)
    if problems:
        raise RunError(f"--fork-from: {path} was trained differently before epoch {epoch}: "
                       + "; ".join(problems))
    return epoch


def restore(path: Path, ckpt: dict, model, opt, lr_sched, scaler, fork: bool,
            sharded: bool = False) -> None:
    """Load the training state of a checkpoint (RunError if it does not fit); ``sharded``: into
    an FSDP2 model and its SAM, each rank taking its shards of the full tensors."""
    try:
        optimizer_state = ckpt["optimizer"]
        if fork:
            # The options of the new run's optimizer are its own: check_fork let through only
            # those of a phase not yet run (SAM's rho, adaptive...). The lr is the
            # scheduler's running value and stays the snapshot's.
            fresh = opt.state_dict()["param_groups"]
            optimizer_state = {**optimizer_state, "param_groups": [
                {**saved, **{k: v for k, v in new.items()
                             if k not in ("params", "lr", "initial_lr")}}
                for saved, new in zip(optimizer_state["param_groups"], fresh, strict=True)]}
        if sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict)
            set_model_state_dict(model, ckpt["model"],
                                 options=StateDictOptions(full_state_dict=True))
            optimizer_state = samfast.fsdp.shard_optimizer_state(opt, optimizer_state)
        else:
            model.load_state_dict(ckpt["model"])
        opt.load_state_dict(optimizer_state)
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        if scaler is not None and ckpt.get("grad_scaler"):
            scaler.load_state_dict(ckpt["grad_scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"{path}: does not fit this run's model and optimizer "
                       f"({_first_line(exc)})") from exc


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


# =============================================================================================
# logging
# =============================================================================================

def versions(device: torch.device) -> dict:
    return {"samfast": samfast.__version__, "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"}


def epoch_cost(counters: dict, seconds: float) -> dict:
    """An epoch's cost from the optimizer's counters (samfast.SAM.counters) and its training
    time: the forward + backward passes run, the optimizer's own time, the fraction of steps
    that ran SAM, and the cost in SGD-step equivalents: passes + optimizer time / the mean
    time of one pass (this epoch's time less the optimizer's, over its passes). An SGD step
    is one pass plus its own optimizer time, so an SGD epoch of S steps costs a little over
    S; a SAM step about 2."""
    passes, opt_s = counters["passes"], counters["optimizer_s"]
    pass_s = (seconds - opt_s) / passes if passes else math.nan
    return {"steps": counters["steps"], "sam_steps": counters["sam_steps"],
            "sam_fraction": counters["sam_steps"] / counters["steps"] if counters["steps"] else 0.0,
            "passes": passes, "optimizer_s": opt_s,
            "cost_sgd_steps": passes + (opt_s / pass_s if pass_s > 0 else 0.0)}


def run_cost(history: list[dict]) -> dict:
    """The run's cost: the sum of its epochs' (those trained before cost accounting existed
    count as missing)."""
    rows = [r for r in history if "cost_sgd_steps" in r]
    steps = sum(r["steps"] for r in rows)
    return {"steps": steps, "sam_steps": sum(r["sam_steps"] for r in rows),
            "sam_fraction": sum(r["sam_steps"] for r in rows) / steps if steps else 0.0,
            "passes": sum(r["passes"] for r in rows),
            "optimizer_s": sum(r["optimizer_s"] for r in rows),
            "cost_sgd_steps": sum(r["cost_sgd_steps"] for r in rows),
            "cost_epochs_missing": len(history) - len(rows)}


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

def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each residual block one unit (its weights all-gathered just before it runs, freed
    after), the root one for the rest."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("Block"):
            fully_shard(module)
    fully_shard(model)


def full_state(model, opt) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts with full tensors on the CPU, as without
    FSDP2: gathered from every rank's shards (every rank calls this; rank 0 gets the model's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model_state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model_state, samfast.fsdp.full_optimizer_state(opt.state_dict())


def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1): one process group, NCCL
    on CUDA (one GPU per local rank), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run(cfg: RunConfig) -> dict:
    """Train as configured; returns the summary (also written to OUT/summary.json). Under
    torchrun every rank trains its shard of each batch; rank 0 alone evaluates, logs and
    writes checkpoints (the others wait for it at the next all-reduce).

    Raises DataError or RunError, before any training, for data, a run directory, a
    checkpoint or a snapshot that cannot be used as asked."""
    rank, world, device = init_distributed(cfg)
    lead = rank == 0
    out = Path(cfg.out)
    found = check_run_dir(cfg)
    setup_determinism(cfg)
    train, test, data = load_data(cfg)
    identity = run_identity(cfg, data, world)
    train, test = train.to(device), test.to(device)
    model = build_model(cfg.model, NUM_CLASSES[cfg.dataset], cfg.dataset).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.fsdp:
        shard_model(model)  # before the optimizer: it takes the sharded params
    opt = build_optimizer(cfg, model, math.ceil(len(train) / cfg.batch_size))
    schedule = cfg.schedule()
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.lr_schedule, cfg.epochs))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    step_model = DistributedDataParallel(model) if world > 1 and not cfg.fsdp else model
    forward_model = torch.compile(step_model) if cfg.compile else step_model

    start_epoch, history, wall_before, fork = 0, [], 0.0, None
    ckpt_path = out / "last.pt"
    resumed = cfg.resume and "last.pt" in found
    if resumed:
        ckpt = read_checkpoint(ckpt_path)
        check_resume(ckpt_path, ckpt, cfg, identity)
        restore(ckpt_path, ckpt, model, opt, lr_sched, scaler, fork=False, sharded=cfg.fsdp)
        start_epoch, history, wall_before = ckpt["epoch"], ckpt["history"], ckpt["wall_time_s"]
        fork = ckpt.get("fork")
        note = f"resuming {ckpt_path} at epoch {start_epoch}"
    elif cfg.fork_from is not None:
        try:
            source = snapshot_path(cfg)
        except ConfigError as exc:  # validated, but gone since
            raise RunError(str(exc)) from exc
        ckpt = read_checkpoint(source)
        start_epoch = check_fork(source, ckpt, cfg, identity)
        restore(source, ckpt, model, opt, lr_sched, scaler, fork=True, sharded=cfg.fsdp)
        history = [{**row, "inherited": True} for row in ckpt["history"]]
        wall_before = ckpt["wall_time_s"]
        fork = {"from": str(source), "epoch": start_epoch}
        note = f"forking {source} at epoch {start_epoch}"
    else:
        note = f"--resume: no {ckpt_path} yet, starting from scratch" if cfg.resume else None
    for k in cfg.snapshot_epochs:
        if k < start_epoch and not (out / f"epoch_{k}.pt").exists():
            raise RunError(f"argument --snapshot-epochs: the run in {out} starts at epoch "
                           f"{start_epoch}, past {k}, and has no epoch_{k}.pt")
    if world > 1:
        dist.barrier()  # every rank has checked the run directory before rank 0 changes it
    if lead:
        # Unless this run continues last.pt, the run files found are another run's
        # (--overwrite, or a --resume that found metrics but no checkpoint): they go.
        clean_run_dir(out, replace=bool(found) and not resumed)
        if note:
            print(note, file=sys.stderr)

    extra_eval = robust_eval(cfg, test) if cfg.eval_robust_every else None
    sharp_batches = sharpness_batches(cfg, train) if cfg.sharpness_every else None
    t_run = time.perf_counter()

    def checkpoint(next_epoch: int) -> dict:
        """Under FSDP2 every rank calls it (the full tensors are gathered from all)."""
        model_state, opt_state = (full_state(model, opt) if cfg.fsdp
                                  else (model.state_dict(), opt.state_dict()))
        return {"format": CHECKPOINT_FORMAT, "model": model_state,
                "optimizer": opt_state, "lr_scheduler": lr_sched.state_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": next_epoch, "config": cfg.record(), "data": data, "world_size": world,
                "fork": fork, "history": history, "torch_rng": torch.get_rng_state(),
                "wall_time_s": wall_before + time.perf_counter() - t_run}

    from tqdm.auto import tqdm
    steps = math.ceil(len(train) / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        if epoch in cfg.snapshot_epochs and (lead or cfg.fsdp):
            snapshot = checkpoint(epoch)
            if lead:
                save_checkpoint(out / f"epoch_{epoch}.pt", snapshot)
        schedule.apply(opt, epoch)
        lr = opt.param_groups[0]["lr"]
        progress = None if (cfg.quiet or not lead) else tqdm(
            total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs} [{schedule.phase(epoch)}]",
            unit="batch", leave=False, disable=None)
        adv = adversarial_inputs(cfg, epoch) if schedule.adversarial_at(epoch) else None
        opt.reset_counters()
        train_loss, train_acc, seconds, _ = train_epoch(cfg, epoch, forward_model, opt, train,
                                                       device, scaler, progress, adv,
                                                       step_model, rank, world)
        cost = epoch_cost(opt.counters, seconds)
        if progress is not None:
            progress.close()
        lr_sched.step()
        row = {"epoch": epoch, "phase": schedule.phase(epoch), "lr": lr,
               "train_loss": train_loss, "train_acc": train_acc, "epoch_time_s": seconds,
               "test_loss": None, "test_acc": None, **cost}
        last = epoch == cfg.epochs - 1
        evaluate_now = last or (epoch + 1) % cfg.eval_every == 0
        save_now = last or (epoch + 1) % cfg.checkpoint_every == 0
        if not lead:
            # FSDP2: the other ranks take part in rank 0's evaluation (every forward gathers
            # the weights) and checkpoint (the full tensors), in the same order
            if cfg.fsdp and evaluate_now:
                evaluate(cfg, model, test, device)
            if cfg.fsdp and save_now:
                checkpoint(epoch + 1)
            continue
        if evaluate_now:
            row["test_loss"], row["test_acc"] = evaluate(cfg, model, test, device)
        if extra_eval is not None and (last or (epoch + 1) % cfg.eval_robust_every == 0):
            row["robust_acc"] = extra_eval(model)
        if sharp_batches is not None and (last or (epoch + 1) % cfg.sharpness_every == 0):
            row.update(measure_sharpness(cfg, model, sharp_batches))
        history.append(row)
        write_metrics(out, history)
        if not cfg.quiet:
            scores = "" if row["test_acc"] is None else \
                f" test loss {row['test_loss']:.3f} acc {row['test_acc']:.2f}%"
            print(f"epoch {epoch + 1:3d}/{cfg.epochs} [{row['phase']}] lr {lr:.4g} "
                  f"train loss {train_loss:.3f} acc {train_acc:.2f}% {seconds:.1f}s "
                  f"SAM steps {100 * cost['sam_fraction']:.0f}% cost "
                  f"{cost['cost_sgd_steps']:.0f} SGD steps{scores}",
                  file=sys.stderr, flush=True)
        if save_now:
            save_checkpoint(ckpt_path, checkpoint(epoch + 1))

    if not lead:
        dist.barrier()  # wait for rank 0's last evaluation and files
        return {}
    final = history[-1]
    summary = {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"],
        "train_loss": final["train_loss"], "train_acc": final["train_acc"],
        "epochs": cfg.epochs, "sam_epochs": schedule.sam_epochs,
        "adversarial_epochs": schedule.adversarial_epochs,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "wall_time_s": wall_before + time.perf_counter() - t_run,
        "skipped_steps": opt.skipped_steps, "backend": opt.backend, "world_size": world,
        "cost": run_cost(history),
        "config": cfg.record(), "data": data, "fork": fork, "versions": versions(device),
    }
    for key in ("robust_acc", "sharpness", "hessian_top"):
        if key in final:
            summary[key] = final[key]
    atomic_write_bytes(out / "summary.json",
                       lambda f: f.write(json.dumps(summary, indent=1).encode()))
    plot_curves(out / "curves.png", history, schedule,
                f"{cfg.model} on {cfg.dataset}, {cfg.optimizer} "
                f"(SAM epochs {schedule.sam_epochs}/{cfg.epochs})")
    if world > 1:
        dist.barrier()  # the other ranks wait here for rank 0's files
    return summary


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        summary = run(cfg)
        if dist.is_available() and dist.is_initialized():
            # every rank past its last collective before any tears its gloo pairs down (gloo
            # otherwise aborted at exit now and then: "terminate called without an active
            # exception")
            dist.barrier()
    except (DataError, RunError) as exc:
        print(f"samfast-train: error: {exc}", file=sys.stderr)
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
