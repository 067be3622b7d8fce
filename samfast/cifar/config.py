"""The configuration of a samfast-train run: one typed dataclass, :class:`RunConfig`.

Each field says how it is set on the command line (flag, help, type, choices) and what it
affects (:class:`Affects`); the source of its default where it has one. Everything else about
configurations is generated from these fields:

* samfast-train's flags (:func:`build_parser`) and their parsing (:func:`parse_config`);
* the config recorded in checkpoints and summaries (:meth:`RunConfig.record`, read back by
  :meth:`RunConfig.from_record`, which fills defaults for fields that an older record lacks);
* a run's identity (:func:`run_identity`): the fields that affect the result, the fingerprint
  of the data actually used and the number of processes. ``--resume`` continues a checkpoint
  only when the identity is unchanged (:func:`identity_changes`), ``--fork-from`` compares it
  except for the phase-dependent fields (:func:`fork_problems`), and samfast-reproduce
  identifies a finished run by it (:func:`run_key`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import samfast
from samfast.cifar.data import NUM_CLASSES
from samfast.cifar.models import MODELS


class Affects(enum.Enum):
    """What a setting changes, which decides where it is compared."""

    RESULT = "result"
    """The model, or what is measured and recorded (metrics rows, sharpness, robust
    accuracy): equal for --resume, --fork-from and in samfast-reproduce's key."""
    SCHEDULE = "schedule"
    """Which phase (SGD/SAM, standard/adversarial) each epoch is in. A fork may change it as
    long as every epoch before the fork point keeps its phase."""
    SAM_EPOCHS = "sam_epochs"
    """Only what happens in SAM epochs: a fork may change it when no epoch before the fork
    point is a SAM epoch."""
    ADVERSARIAL_EPOCHS = "adversarial_epochs"
    """Only what happens in adversarial-training epochs (same rule as SAM_EPOCHS)."""
    DATA = "data"
    """Where the data come from: compared through the fingerprint of the arrays loaded, so a
    copy of the same data elsewhere is the same run and changed files are not."""
    NOTHING = "nothing"
    """Where and how the run reports or is checkpointed; free to change on --resume."""


class ConfigError(ValueError):
    """A setting out of range; ``flag`` names it."""

    def __init__(self, flag: str, why: str) -> None:
        super().__init__(f"argument {flag}: {why}")
        self.flag = flag


def pixels(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from exc


def epoch_list(text: str) -> tuple[int, ...]:
    """Comma-separated epochs, e.g. 50,100,150."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of epochs: {text!r}") from exc


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def setting(default: Any = None, *, doc: str | None, group: str, affects: Affects,
            type=None, choices=None, source: str | None = None, default_factory=None):
    """A RunConfig field. ``type`` parses the flag's text (default: the default's type);
    a bool field is a store_true flag."""
    metadata = {"doc": doc, "group": group, "affects": affects, "type": type,
                "choices": choices, "source": source}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DATA, OPT, SAM, SHARP, ADV, RUN = (
    "data", "model and optimization", "SAM and its schedule",
    "sharpness (top Hessian eigenvalue of the training loss)",
    "adversarial training (PGD) and robust evaluation", "run")
OPTIMIZERS = ("sgd", "sam", "asam", "usam")
SAM_POLICIES = ("switch", "interval", "looksam", "random", "adaptive")
LR_SCHEDULES = ("step_wrn", "multistep", "cosine")
AUGMENTATIONS = ("crop_flip", "flip", "none")
R, NOTHING = Affects.RESULT, Affects.NOTHING


@dataclass(frozen=True)
class RunConfig:
    # -- data
    dataset: str = setting("cifar10", doc=None, group=DATA, affects=R,
                           choices=sorted(NUM_CLASSES))
    data_dir: str | None = setting(
        doc="train_*.npz + test.npz, or the official python folders (default: $SAMFAST_DATA, "
            "else the --download cache)", group=DATA, affects=Affects.DATA, type=str)
    download: bool = setting(False, doc="download with torchvision", group=DATA,
                             affects=NOTHING)
    train_subset: int | None = setting(doc="train on a stratified subset of N images",
                                       group=DATA, affects=R, type=int)
    test_subset: int | None = setting(doc="evaluate on a stratified subset of N test images",
                                      group=DATA, affects=R, type=int)
    augment: str = setting("crop_flip", doc="training augmentation: random crop (padding 4) "
                           "and horizontal flip, flip only, or none", group=DATA, affects=R,
                           choices=AUGMENTATIONS)
    cutout: int = setting(0, doc="cutout square size (0: off)", group=DATA, affects=R)
    # -- model and optimization
    model: str = setting("small_cnn", doc=None, group=OPT, affects=R, choices=sorted(MODELS))
    epochs: int = setting(10, doc=None, group=OPT, affects=R)
    batch_size: int = setting(128, doc=None, group=OPT, affects=R,
                              source="the released code's default")
    lr: float = setting(0.1, doc=None, group=OPT, affects=R)
    momentum: float = setting(0.9, doc=None, group=OPT, affects=R,
                              source="the released code's default")
    weight_decay: float = setting(5e-4, doc=None, group=OPT, affects=R,
                                  source="the released code's value for the WRN recipe")
    nesterov: bool = setting(False, doc=None, group=OPT, affects=R)
    lr_schedule: str = setting("step_wrn", doc="step_wrn: x0.2 at 30/60/80%% of the epochs; "
                               "multistep: x0.1 at 50/75%%; cosine: to 0", group=OPT,
                               affects=R, choices=LR_SCHEDULES,
                               source="Zagoruyko & Komodakis 2016 (WRN step schedule)")
    label_smoothing: float = setting(0.0, doc=None, group=OPT, affects=R)
    # -- SAM and its schedule
    optimizer: str = setting("sam", doc=None, group=SAM, affects=Affects.SAM_EPOCHS,
                             choices=OPTIMIZERS)
    rho: float | None = setting(doc="neighbourhood radius (default 0.05; 2.0 for asam)",
                                group=SAM, affects=Affects.SAM_EPOCHS, type=float,
                                source="0.05: Foret et al. 2021; 2.0 for ASAM: Kwon et al. 2021")
    eta: float = setting(0.0, doc="ASAM's eta", group=SAM, affects=Affects.SAM_EPOCHS)
    sam_start: int = setting(0, doc="first SAM epoch (0-based): epochs before it use SGD",
                             group=SAM, affects=Affects.SCHEDULE)
    sam_end: int | None = setting(doc="SAM only before this epoch (SAM -> SGD); default: "
                                  "until the end", group=SAM, affects=Affects.SCHEDULE, type=int)
    # A switch happens next to a SAM epoch, so "SAM epochs" covers where it acts.
    reset_momentum: bool = setting(False, doc="clear the momentum buffers when SAM switches "
                                   "on or off", group=SAM, affects=Affects.SAM_EPOCHS)
    ddp_ascent: str = setting("global", doc="under torchrun: all-reduce the ascent gradient "
                              "(global) or perturb each replica with its own (local, "
                              "m-sharpness)", group=SAM, affects=Affects.SAM_EPOCHS,
                              choices=("global", "local"))
    fsdp: bool = setting(False, doc="under torchrun: shard the weights, gradients and SAM's "
                         "state over the processes with FSDP2 (fully_shard) instead of "
                         "replicating them with DDP (global ascent, reference backend)",
                         group=SAM, affects=R)
    # Which steps of a SAM epoch run SAM (samfast/policies.py): only SAM epochs consult it.
    sam_policy: str = setting("switch", doc="which steps of the SAM epochs run SAM: switch "
                              "(every one: the schedule's epochs alone decide), interval (every "
                              "--interval-k-th), looksam (LookSAM: a full SAM step every "
                              "--looksam-k, its orthogonal gradient reused in between), random "
                              "(each with probability --random-p), adaptive (AE-SAM: when the "
                              "squared gradient norm is large against its running statistics)",
                              group=SAM, affects=Affects.SAM_EPOCHS, choices=SAM_POLICIES)
    interval_k: int = setting(2, doc="--sam-policy interval: SAM every K steps", group=SAM,
                              affects=Affects.SAM_EPOCHS,
                              source="choice (Composer's SAM(interval=k))")
    looksam_k: int = setting(5, doc="--sam-policy looksam: a full SAM step every K steps",
                             group=SAM, affects=Affects.SAM_EPOCHS,
                             source="choice (Liu et al. 2022 use k = 5 and 10)")
    looksam_alpha: float = setting(0.7, doc="--sam-policy looksam: weight of the reused "
                                   "orthogonal gradient", group=SAM,
                                   affects=Affects.SAM_EPOCHS,
                                   source="pytorch-optimizer's LookSAM default")
    random_p: float = setting(0.5, doc="--sam-policy random: probability of a SAM step",
                              group=SAM, affects=Affects.SAM_EPOCHS, source="choice")
    random_p_end: float | None = setting(doc="--sam-policy random: the probability rises (or "
                                         "falls) linearly from --random-p to this over the "
                                         "SAM epochs (default: constant)", group=SAM,
                                         affects=Affects.SAM_EPOCHS, type=float)
    random_seed: int | None = setting(doc="--sam-policy random: seed of the draws (default: "
                                      "--seed)", group=SAM, affects=Affects.SAM_EPOCHS,
                                      type=int)
    adaptive_delta: float = setting(0.9, doc="--sam-policy adaptive: forgetting rate of the "
                                    "running mean and variance of ||g||^2", group=SAM,
                                    affects=Affects.SAM_EPOCHS,
                                    source="our reading of Jiang et al. 2023 (AE-SAM)")
    adaptive_lambda1: float = setting(-1.0, doc="--sam-policy adaptive: threshold c at the "
                                      "end of the SAM epochs (SAM when ||g||^2 >= mean + c "
                                      "std)", group=SAM, affects=Affects.SAM_EPOCHS,
                                      source="our reading of Jiang et al. 2023 (AE-SAM)")
    adaptive_lambda2: float = setting(1.0, doc="--sam-policy adaptive: threshold c at the "
                                      "start of the SAM epochs (linear in between)", group=SAM,
                                      affects=Affects.SAM_EPOCHS,
                                      source="our reading of Jiang et al. 2023 (AE-SAM)")
    backend: str = setting("auto", doc="samfast backend (auto, reference, native, triton)",
                           group=SAM, affects=R)
    # -- sharpness
    sharpness_every: int = setting(0, doc="measure every N epochs and at the end (0: never)",
                                   group=SHARP, affects=R)
    sharpness_samples: int = setting(1024, doc="on this fixed stratified subset of the "
                                     "training images", group=SHARP, affects=R)
    sharpness_k: int = setting(1, doc="how many top eigenvalues", group=SHARP, affects=R)
    sharpness_iters: int = setting(20, doc="Lanczos iterations at most", group=SHARP,
                                   affects=R)
    # -- adversarial training and robust evaluation
    adv_start: int | None = setting(doc="first epoch of PGD adversarial training (default: "
                                    "none)", group=ADV, affects=Affects.SCHEDULE, type=int)
    adv_end: int | None = setting(doc="adversarial training only before this epoch",
                                  group=ADV, affects=Affects.SCHEDULE, type=int)
    # eps, alpha and the norm also define the robust evaluation, so they count everywhere.
    adv_eps: float = setting(8 / 255, doc="radius in pixels of [0, 1]; '8/255' accepted",
                             group=ADV, affects=R, type=pixels,
                             source="the standard CIFAR-10 recipe (Madry et al. 2018)")
    adv_alpha: float = setting(2 / 255, doc="PGD step size", group=ADV, affects=R,
                               type=pixels, source="Madry et al. 2018")
    adv_steps: int = setting(10, doc="PGD steps in training", group=ADV,
                             affects=Affects.ADVERSARIAL_EPOCHS, source="Madry et al. 2018")
    adv_norm: str = setting("linf", doc=None, group=ADV, affects=R, choices=("linf", "l2"))
    eval_robust_every: int = setting(0, doc="robust accuracy every N epochs and at the end "
                                     "(0: never)", group=ADV, affects=R)
    eval_pgd_steps: int = setting(20, doc=None, group=ADV, affects=R)
    eval_robust_samples: int = setting(500, doc="on this fixed stratified subset of the test "
                                       "images", group=ADV, affects=R)
    # -- run
    amp: str = setting("none", doc=None, group=RUN, affects=R, choices=("none", "bf16", "fp16"))
    channels_last: bool = setting(False, doc=None, group=RUN, affects=R)
    compile: bool = setting(False, doc="torch.compile the model", group=RUN, affects=R)
    device: str = setting(doc=None, group=RUN, affects=R, default_factory=_default_device)
    seed: int = setting(0, doc=None, group=RUN, affects=R)
    deterministic: bool = setting(False, doc="deterministic algorithms (bit-identical resume "
                                  "on the CPU)", group=RUN, affects=R)
    eval_every: int = setting(1, doc="epochs between evaluations", group=RUN, affects=R)
    out: str = setting("runs/latest", doc="the run directory", group=RUN, affects=NOTHING)
    resume: bool = setting(False, doc="continue from OUT/last.pt if present", group=RUN,
                           affects=NOTHING)
    overwrite: bool = setting(False, doc="replace the run already in OUT", group=RUN,
                              affects=NOTHING)
    checkpoint_every: int = setting(1, doc="epochs between checkpoints", group=RUN,
                                    affects=NOTHING)
    snapshot_epochs: tuple[int, ...] = setting(
        (), doc="also keep OUT/epoch_K.pt, the state at the start of epoch K, for each K "
                "(comma-separated), to --fork-from", group=RUN, affects=NOTHING, type=epoch_list)
    fork_from: str | None = setting(
        doc="start from a snapshot of another run: DIR (with --fork-epoch) or DIR/epoch_K.pt; "
            "settings must match it up to the schedule", group=RUN, affects=NOTHING, type=str)
    fork_epoch: int | None = setting(doc="the epoch K of --fork-from DIR", group=RUN,
                                     affects=NOTHING, type=int)
    eval_batch_size: int = setting(500, doc=None, group=RUN, affects=NOTHING)
    quiet: bool = setting(False, doc="no progress bars", group=RUN, affects=NOTHING)

    # -- derived --------------------------------------------------------------------------

    def schedule(self) -> samfast.SwitchSchedule:
        """Which phase each epoch is in. ``--optimizer sgd`` has no SAM epoch whatever
        --sam-start says."""
        sam = self.optimizer != "sgd"
        return samfast.SwitchSchedule(
            self.epochs, sam_start=self.sam_start if sam else None,
            sam_end=self.sam_end if sam else None, adv_start=self.adv_start,
            adv_end=self.adv_end, reset_momentum=self.reset_momentum)

    def policy(self, steps_per_epoch: int) -> samfast.policies.Policy | None:
        """The per-step SAM policy (None for ``switch``: every step of a SAM epoch is a SAM
        step). The policy counts only the steps of SAM epochs, so its T (AE-SAM's threshold
        schedule, RandomSwitch's linear p) is their number."""
        sam_steps = max(1, self.schedule().sam_epochs * steps_per_epoch)
        if self.sam_policy == "interval":
            return samfast.Interval(self.interval_k)
        if self.sam_policy == "looksam":
            return samfast.LookSAM(self.looksam_k, self.looksam_alpha)
        if self.sam_policy == "random":
            seed = self.seed if self.random_seed is None else self.random_seed
            if self.random_p_end is None:
                return samfast.RandomSwitch(self.random_p, seed=seed)
            return samfast.RandomSwitch.linear(self.random_p, self.random_p_end, sam_steps, seed)
        if self.sam_policy == "adaptive":
            return samfast.AdaptiveSAM(sam_steps, self.adaptive_delta, self.adaptive_lambda1,
                                       self.adaptive_lambda2)
        return None

    def record(self) -> dict[str, Any]:
        """Every field, as JSON values (what checkpoints and summaries hold)."""
        record = {}
        for f in fields(self):
            value = getattr(self, f.name)
            record[f.name] = list(value) if isinstance(value, tuple) else value
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "RunConfig":
        """The config of a record; fields it lacks (added since it was written) take their
        defaults, which are the behaviour of the code that wrote it."""
        known = {f.name: f for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in record.items() if k in known}
        return cls(**values)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def affects(name: str) -> Affects:
    return RunConfig.__dataclass_fields__[name].metadata["affects"]


def source(name: str) -> str | None:
    """Where the default of field ``name`` comes from, if it has a source."""
    return RunConfig.__dataclass_fields__[name].metadata["source"]


def to_argv(values: dict[str, Any]) -> list[str]:
    """samfast-train flags that set these fields (True: the bare flag; None and False: none)."""
    argv = []
    for name, value in values.items():
        kind = RunConfig.__dataclass_fields__[name]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag(name))
        elif kind.metadata["type"] is epoch_list:
            argv += [flag(name), ",".join(str(v) for v in value)]
        else:
            argv += [flag(name), str(value)]
    return argv


# =============================================================================================
# command line
# =============================================================================================

def build_parser() -> argparse.ArgumentParser:
    from samfast.cifar import train  # its docstring describes the command
    p = argparse.ArgumentParser(prog="samfast-train", description=train.__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for f in fields(RunConfig):
        md = f.metadata
        if md["group"] not in groups:
            groups[md["group"]] = p.add_argument_group(md["group"])
        group = groups[md["group"]]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"default": default}
        if md["doc"] is not None:
            kwargs["help"] = md["doc"]
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = md["type"] or type(default)
            if md["choices"] is not None:
                kwargs["choices"] = md["choices"]
        group.add_argument(flag(f.name), **kwargs)
    return p


# the options of each --sam-policy (validate refuses them with another policy)
POLICY_OPTIONS = {"interval": ("interval_k",), "looksam": ("looksam_k", "looksam_alpha"),
                  "random": ("random_p", "random_p_end", "random_seed"),
                  "adaptive": ("adaptive_delta", "adaptive_lambda1", "adaptive_lambda2")}


def validate(cfg: RunConfig) -> None:
    """Every setting checked before any work; raises ConfigError naming the flag."""
    def bad(name: str, why: str):
        raise ConfigError(flag(name), why)

    if cfg.epochs < 1:
        bad("epochs", f"must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        bad("batch_size", f"must be >= 1, got {cfg.batch_size}")
    for name in ("lr", "momentum", "weight_decay", "eta", "adv_eps", "adv_alpha"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            bad(name, f"must be a finite number >= 0, got {value}")
    if cfg.lr == 0:
        bad("lr", "must be > 0")
    for name in ("interval_k", "looksam_k"):
        if getattr(cfg, name) < 1:
            bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("random_p", "random_p_end"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= 1:
            bad(name, f"must be a probability in [0, 1], got {value}")
    if not (math.isfinite(cfg.looksam_alpha) and cfg.looksam_alpha >= 0):
        bad("looksam_alpha", f"must be a finite number >= 0, got {cfg.looksam_alpha}")
    if cfg.random_seed is not None and cfg.random_seed < 0:
        bad("random_seed", f"must be >= 0, got {cfg.random_seed}")
    if not 0 < cfg.adaptive_delta < 1:
        bad("adaptive_delta", f"must be in (0, 1), got {cfg.adaptive_delta}")
    for name in ("adaptive_lambda1", "adaptive_lambda2"):
        if not math.isfinite(getattr(cfg, name)):
            bad(name, f"must be a finite number, got {getattr(cfg, name)}")
    # a policy's options without that policy would be ignored (while still changing the
    # run's identity): refused, as is a policy in a run without SAM epochs
    defaults = {f.name: f.default for f in fields(RunConfig)}
    for policy, names in POLICY_OPTIONS.items():
        for name in names:
            if cfg.sam_policy != policy and getattr(cfg, name) != defaults[name]:
                bad(name, f"is an option of --sam-policy {policy}; this run's policy is "
                          f"{cfg.sam_policy}, so it would be ignored")
    if cfg.sam_policy != "switch" and cfg.optimizer == "sgd":
        bad("sam_policy", f"{cfg.sam_policy} decides which steps of the SAM epochs run SAM; "
                          "--optimizer sgd has no SAM epoch, so it would never be consulted")
    if (cfg.sam_policy in ("looksam", "adaptive") and cfg.ddp_ascent == "local"
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        bad("sam_policy", f"{cfg.sam_policy} needs --ddp-ascent global under torchrun (AE-SAM "
                          "decides from the averaged gradient's norm, LookSAM's g_v comes from "
                          "the averaged gradient; samfast.distributed.sam_step refuses both "
                          "with ascent='local')")
    if cfg.rho is not None and (not math.isfinite(cfg.rho) or cfg.rho < 0):
        bad("rho", f"must be a finite number >= 0, got {cfg.rho}")
    if not 0 <= cfg.label_smoothing < 1:
        bad("label_smoothing", f"must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.cutout <= 32:
        bad("cutout", f"must be in 0..32, got {cfg.cutout}")
    if not 0 <= cfg.sam_start <= cfg.epochs:
        bad("sam_start", f"must be in 0..{cfg.epochs} (--epochs), got {cfg.sam_start}")
    if cfg.sam_end is not None and not cfg.sam_start <= cfg.sam_end <= cfg.epochs:
        bad("sam_end", f"must be in {cfg.sam_start}..{cfg.epochs}, got {cfg.sam_end}")
    for name in ("train_subset", "test_subset"):
        value = getattr(cfg, name)
        if value is not None and value < 10:
            bad(name, f"must be >= 10 (one image per class at least), got {value}")
    if cfg.adv_start is not None and not 0 <= cfg.adv_start <= cfg.epochs:
        bad("adv_start", f"must be in 0..{cfg.epochs} (--epochs), got {cfg.adv_start}")
    if cfg.adv_end is not None:
        if cfg.adv_start is None:
            bad("adv_end", "needs --adv-start")
        if not cfg.adv_start <= cfg.adv_end <= cfg.epochs:
            bad("adv_end", f"must be in {cfg.adv_start}..{cfg.epochs}, got {cfg.adv_end}")
    for name in ("adv_steps", "eval_pgd_steps", "eval_robust_every", "sharpness_every"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.eval_robust_samples < 10:
        bad("eval_robust_samples", f"must be >= 10, got {cfg.eval_robust_samples}")
    for name in ("sharpness_samples", "sharpness_k", "sharpness_iters", "checkpoint_every",
                 "eval_every", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        bad("device", f"{cfg.device} requested but CUDA is not available")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        bad("device", str(exc))
    if cfg.amp == "fp16" and cfg.ddp_ascent == "local" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        bad("amp", "fp16 loss scaling with --ddp-ascent local is not supported yet; use "
                   "--amp bf16 or --ddp-ascent global")
    if cfg.backend != "auto" and cfg.backend not in samfast.available_backends(device):
        bad("backend", f"{cfg.backend!r} is not available on {device} (available: "
                       f"{', '.join(samfast.available_backends(device))})")
    if cfg.fsdp:
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            bad("fsdp", "needs torchrun with 2 or more processes (the shards' owners)")
        # what samfast.SAM refuses on FSDP2 params, and what the trainer does not run on them
        for name, refused, why in (
                ("ddp_ascent", cfg.ddp_ascent == "local", "each rank holds a shard of one "
                 "replica: use --ddp-ascent global"),
                ("amp", cfg.amp == "fp16", "fp16 loss scaling would need the ranks to agree on "
                 "overflows: use --amp bf16"),
                ("sam_policy", cfg.sam_policy == "looksam", "LookSAM's projection is not "
                 "sharded yet"),
                ("compile", cfg.compile, "not tested with FSDP2 yet"),
                ("sharpness_every", cfg.sharpness_every > 0, "the Hessian measurements run on "
                 "rank 0 alone"),
                ("eval_robust_every", cfg.eval_robust_every > 0, "the robust evaluation runs "
                 "on rank 0 alone"),
                ("adv_start", cfg.adv_start is not None, "adversarial training is not tested "
                 "with FSDP2 yet")):
            if refused:
                bad(name, f"not supported with --fsdp ({why})")
    if cfg.resume and cfg.overwrite:
        bad("overwrite", "not allowed with --resume (continue the run, or replace it)")
    for k in cfg.snapshot_epochs:
        if not 1 <= k < cfg.epochs:
            bad("snapshot_epochs", f"each must be in 1..{cfg.epochs - 1} (an epoch that is "
                                   f"trained), got {k}")
    if cfg.fork_epoch is not None:
        if cfg.fork_from is None:
            bad("fork_epoch", "needs --fork-from")
        if not 1 <= cfg.fork_epoch < cfg.epochs:
            bad("fork_epoch", f"must be in 1..{cfg.epochs - 1}, got {cfg.fork_epoch}")
    if cfg.fork_from is not None:
        snapshot_path(cfg)


def snapshot_path(cfg: RunConfig) -> Path:
    """The snapshot that --fork-from (and --fork-epoch) name; ConfigError if there is none."""
    source = Path(cfg.fork_from)
    if source.is_dir():
        if cfg.fork_epoch is None:
            raise ConfigError("--fork-epoch", f"needed with --fork-from {source} (a directory)")
        source = source / f"epoch_{cfg.fork_epoch}.pt"
        if not source.is_file():
            raise ConfigError("--fork-from", f"no {source.name} in {source.parent} (run the "
                                              f"source with --snapshot-epochs {cfg.fork_epoch})")
    elif not source.is_file():
        raise ConfigError("--fork-from", f"no such file or directory: {source}")
    return source


def _checked(cfg: RunConfig) -> RunConfig:
    validate(cfg)
    if cfg.rho is None:
        cfg = dataclasses.replace(cfg, rho=2.0 if cfg.optimizer == "asam" else 0.05)
    return cfg


def parse_config(argv=None) -> RunConfig:
    """samfast-train's command line as a validated RunConfig (``rho`` resolved to its
    optimizer's default); exits with status 2 and a message naming the flag on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _checked(RunConfig(**vars(args)))
    except ConfigError as exc:
        parser.error(str(exc))


def config_from_flags(argv: list[str]) -> RunConfig:
    """As parse_config, for flags a program composed: a setting out of range raises
    ConfigError for the caller to report."""
    return _checked(RunConfig(**vars(build_parser().parse_args(argv))))


# =============================================================================================
# identity: what must match to continue, fork or reuse a run
# =============================================================================================

def run_identity(cfg: RunConfig, data: dict | None, world_size: int) -> dict[str, Any]:
    """The settings that affect the result (JSON values), the fingerprint of the data used
    (``{"train": sha256, "test": sha256}`` of the arrays after subsetting) and the number of
    processes (under torchrun each rank's BatchNorm sees its shard)."""
    record = cfg.record()
    identity = {f.name: record[f.name] for f in fields(RunConfig)
                if f.metadata["affects"] not in (Affects.NOTHING, Affects.DATA)}
    identity["data"] = data
    identity["world_size"] = world_size
    return identity


def run_key(identity: dict[str, Any]) -> str:
    """Canonical JSON of an identity: equal keys, same computation."""
    return json.dumps(identity, sort_keys=True)


def identity_changes(old: dict[str, Any], new: dict[str, Any], old_cfg: RunConfig,
                     new_cfg: RunConfig, skip=frozenset()) -> list[str]:
    """``--flag old -> new`` for every entry of the identity that differs (except ``skip``)."""
    changes = []
    for name in dict.fromkeys([*new, *old]):
        if name in skip or old.get(name) == new.get(name):
            continue
        if name == "data":
            what = ", ".join(f"{part} {_short(old, part)} -> {_short(new, part)}"
                             for part in ("train", "test")
                             if _short(old, part, 64) != _short(new, part, 64))
            where = ("" if old_cfg.data_dir == new_cfg.data_dir
                     else f"--data-dir {old_cfg.data_dir} -> {new_cfg.data_dir}, ")
            changes.append(f"the data used ({where}sha256 of the arrays after subsetting: "
                           f"{what})")
        elif name == "world_size":
            changes.append(f"processes (torchrun) {old.get(name)} -> {new.get(name)}")
        else:
            changes.append(f"{flag(name)} {old.get(name)} -> {new.get(name)}")
    return changes


def _short(identity: dict, part: str, length: int = 12) -> str:
    digest = (identity.get("data") or {}).get(part)
    return "(not recorded)" if digest is None else digest[:length]


def fork_problems(source: dict[str, Any], new: dict[str, Any], source_cfg: RunConfig,
                  new_cfg: RunConfig, epoch: int) -> list[str]:
    """Why a run of ``new_cfg`` cannot start from ``source_cfg``'s state at the start of
    ``epoch`` (empty: it can). The first ``epoch`` epochs must have been trained exactly as
    the new run would train them: every setting that affects the result equal, except the
    schedule, as long as each of those epochs keeps its phase, and the options of a phase
    (SAM, adversarial) that none of them is in."""
    old_sched, new_sched = source_cfg.schedule(), new_cfg.schedule()
    phases = [f"epoch {e} is {old_sched.phase(e)} in the source, {new_sched.phase(e)} here"
              for e in range(epoch) if old_sched.phase(e) != new_sched.phase(e)]
    free = {f.name for f in fields(RunConfig) if f.metadata["affects"] is Affects.SCHEDULE}
    if not any(old_sched.sam_at(e) for e in range(epoch)):
        free |= {f.name for f in fields(RunConfig)
                 if f.metadata["affects"] is Affects.SAM_EPOCHS}
    if not any(old_sched.adversarial_at(e) for e in range(epoch)):
        free |= {f.name for f in fields(RunConfig)
                 if f.metadata["affects"] is Affects.ADVERSARIAL_EPOCHS}
    return phases[:1] + identity_changes(source, new, source_cfg, new_cfg, skip=free)
