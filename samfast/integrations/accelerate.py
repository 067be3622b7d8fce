"""samfast with Hugging Face Accelerate, and in the ``transformers`` Trainer.

Accelerate: prepare a SAM like any optimizer and call :func:`sam_step` per batch::

    model, opt, loader = accelerator.prepare(model, samfast.SAM(model.parameters(), ...), loader)
    for x, y in loader:
        sam_step(accelerator, model, opt, lambda: F.cross_entropy(model(x), y))

What Accelerate's pieces do with SAM:

* ``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which forwards
  ``state_dict``, ``load_state_dict``, ``param_groups`` and ``state`` to the SAM (so
  ``accelerator.save_state`` / ``load_state`` carry samfast's entry) but not ``first_step``,
  ``second_step`` or ``base_step``; its ``step()`` is one closure-less ``optimizer.step()``
  (through ``scaler.step`` under fp16), which cannot run two passes. :func:`sam_step` steps
  the SAM inside (:func:`samfast.distributed.sam_optimizer`).
* ``accelerator.backward`` does each backward (fp16: scaled by ``accelerator.scaler``, which the
  SAM steps then unscale); a prepared model runs its forward under the chosen autocast.
* ``accelerator.accumulate`` cannot express SAM's accumulation: it streams each micro-batch
  once, while SAM needs the ascent of the whole batch before the second pass over the same
  micro-batches. Use ``accumulation_steps=`` here (under DDP the micro-batches before the last
  of each pass run in ``no_sync``), with ``Accelerator(gradient_accumulation_steps=1)``.
* ``accelerator.clip_grad_norm_`` between the passes would unscale the gradients outside
  the SAM steps (under fp16 the steps' own unscale then refuses to run twice); use
  ``clip_grad_norm=`` here, which clips the descent gradient, unscaled.
* Distributed types: none or DDP (``MULTI_CPU``, ``MULTI_GPU``, ...); DeepSpeed, FSDP,
  Megatron-LM and XLA are refused (sharded or foreign optimizer steps).

The ``transformers`` Trainer: :class:`SAMTrainer` (see its docstring).

This module imports neither package at import time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..bn import running_stats_disabled
from ..distributed import _sam_step, sam_optimizer, unwrap
from ..schedule import SwitchSchedule

_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def _check_accelerator(accelerator) -> None:
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in _UNSUPPORTED:
        raise RuntimeError(f"samfast does not support Accelerate's {kind} yet (it shards the "
                           "parameters or runs the optimizer step itself); use DDP")


def sam_step(accelerator, model: torch.nn.Module, optimizer, loss_fn: Callable[..., Tensor], *,
             ascent: str = "global", accumulation_steps: int | None = None,
             clip_grad_norm: float | None = None, clip_ascent: bool = False) -> Tensor:
    """:func:`samfast.distributed.sam_step` for a prepared model and optimizer: backward passes
    through ``accelerator.backward``, fp16 unscaling with ``accelerator.scaler`` (then its
    ``update()``), DDP's ``no_sync`` when the prepared model is DDP. Returns the first-pass
    loss, detached."""
    _check_accelerator(accelerator)
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("Invalid Accelerator: gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}; SAM's micro-batches are "
                         "needed in both passes, so accumulate with sam_step(..., "
                         "accumulation_steps=k) and gradient_accumulation_steps=1")
    return _sam_step(model, optimizer, loss_fn, ascent=ascent, grad_scaler=accelerator.scaler,
                     accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm,
                     clip_ascent=clip_ascent, backward=accelerator.backward)


class _FinishSAMStep(torch.optim.Optimizer):
    """The optimizer the Trainer steps: ``step()`` finishes the SAM step that
    ``SAMTrainer.training_step`` began (``second_step``, or ``base_step`` in an SGD phase).
    Everything else is the SAM's: groups, state, ``state_dict``. Like Accelerate's own
    wrapper it does not call ``Optimizer.__init__`` (it owns no parameters)."""

    def __init__(self, sam) -> None:  # noqa: D107 (no super().__init__: see the docstring)
        self.optimizer = sam
        self._opt_called = False

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise RuntimeError("SAMTrainer's optimizer step takes no closure")
        if self.optimizer.sam_enabled:
            self.optimizer.second_step()
        else:
            self.optimizer.base_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


def _refuse_policy(sam) -> None:
    """SAMTrainer runs both passes inside ``training_step`` and lets the Trainer clip and step
    after it: a policy's one-pass steps (or AE-SAM's decision after the first pass) would need
    the Trainer to skip the second pass and clip before the step is taken."""
    if sam.policy is not None:
        raise ValueError(f"Invalid optimizer: SAMTrainer does not support SAM policies yet "
                         f"(got {type(sam.policy).__name__}); use sam.policy = None, or "
                         "samfast.integrations.accelerate.sam_step in an Accelerate loop")


def _sam_trainer_class():
    from transformers import Trainer, TrainerCallback

    class _RestoreSkippedStep(TrainerCallback):
        """Under fp16 the GradScaler skips an overflowing step without calling the optimizer:
        the weights would stay at w + e. Put w back right after (a no-op otherwise)."""

        def __init__(self, sam) -> None:
            self.sam = sam

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.sam.abort_step()

    class SAMTrainer(Trainer):
        """``transformers.Trainer`` whose steps are SAM steps.

        Pass the SAM as ``optimizers=(sam, scheduler_or_None)``; ``sam_schedule`` (a
        :class:`samfast.SwitchSchedule`) is applied by epoch. ``training_step`` runs the first
        pass (``Trainer.training_step``: ``compute_loss`` and ``accelerator.backward``), the
        ascent, and the second pass at w + e with BatchNorm running statistics left alone;
        the Trainer then clips the descent gradient (``max_grad_norm``, the usual meaning) and
        calls ``optimizer.step()``, which restores w and runs the base step. In an SGD phase it
        is the Trainer's own step. ``gradient_accumulation_steps`` must be 1 (the Trainer feeds
        ``training_step`` one micro-batch at a time; SAM needs the whole batch's ascent before
        the second pass); DeepSpeed and FSDP are refused. Checkpoints carry samfast's state
        through the Trainer's own optimizer ``state_dict``.
        """

        def __init__(self, *args, optimizers=(None, None), sam_schedule: SwitchSchedule | None
                     = None, **kwargs) -> None:
            optimizer, scheduler = optimizers
            if optimizer is None:
                raise ValueError("SAMTrainer needs optimizers=(samfast.SAM(...), scheduler or "
                                 "None)")
            self.sam = sam_optimizer(optimizer)
            self.sam_schedule = sam_schedule
            super().__init__(*args, optimizers=(_FinishSAMStep(self.sam), scheduler), **kwargs)
            if self.args.gradient_accumulation_steps != 1:
                raise ValueError("Invalid gradient_accumulation_steps: SAMTrainer needs 1 (each "
                                 "micro-batch would be needed in both passes)")
            _check_accelerator(self.accelerator)
            _refuse_policy(self.sam)
            self.add_callback(_RestoreSkippedStep(self.sam))

        def training_step(self, model, inputs, num_items_in_batch=None):
            sam = self.sam
            _refuse_policy(sam)
            if self.sam_schedule is not None:
                epoch = int(self.state.epoch or 0)
                if sam.sam_enabled != self.sam_schedule.sam_at(epoch):
                    self.sam_schedule.apply(sam, epoch)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not sam.sam_enabled:
                return loss
            sam.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler)
            try:
                with running_stats_disabled(unwrap(model), enabled=sam.perturbed):
                    super().training_step(model, inputs, num_items_in_batch)
            except BaseException:  # the weights hold w + e: put w back before propagating
                sam.abort_step()
                raise
            return loss

    return SAMTrainer


def __getattr__(name: str):
    # SAMTrainer subclasses transformers.Trainer, so it is built on first access: importing
    # this module for sam_step does not import transformers.
    if name == "SAMTrainer":
        cls = _sam_trainer_class()
        globals()["SAMTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
