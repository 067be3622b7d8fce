"""samfast in PyTorch Lightning 2.x (``pytorch_lightning`` or ``lightning.pytorch``).

A SAM step needs two forward/backward passes around the ascent, so the LightningModule uses
manual optimization and calls :func:`sam_training_step` from its ``training_step``::

    class LitModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = ...

        def configure_optimizers(self):
            return samfast.SAM(self.parameters(), lr=0.05, momentum=0.9)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return sam_training_step(self, lambda: F.cross_entropy(self.net(x), y))

What Lightning's machinery does with it, and why the step is not ``LightningOptimizer.step``:

* Backward passes go through ``self.manual_backward``: under ``precision="16-mixed"`` the
  precision plugin scales the loss with its GradScaler, and under DDP it prepares the reducer
  for each backward (both passes all-reduce; ``no_sync`` turns that off for the local ascent
  and the micro-batches before the last). The forward runs in the plugin's autocast, since
  ``training_step`` does.
* The optimizer's own methods run the step (``first_step``, ``second_step``, ``base_step``,
  with the plugin's scaler, then ``scaler.update()``). ``LightningOptimizer.step`` would hand
  the step to the precision plugin, which under fp16 calls ``scaler.step(optimizer)``: one
  closure-less ``optimizer.step()``, which cannot run SAM's two passes. The progress hooks that
  ``LightningOptimizer.step`` calls around a step are called here, so ``trainer.global_step``,
  ``max_steps`` and step-based checkpoints count SAM steps as they count any optimizer step.
  Lightning's ``on_before_optimizer_step`` hook is not called.
* Checkpoints are Lightning's own: the optimizer's ``state_dict`` (with samfast's entry:
  ``sam_enabled``, ``skipped_steps``) and the precision plugin's scaler state are saved and
  restored by ``Trainer.fit(ckpt_path=...)``.
* ``Trainer(gradient_clip_val=..., accumulate_grad_batches=...)`` are refused by Lightning under
  manual optimization; use ``clip_grad_norm=`` and ``accumulation_steps=`` here.
* LR schedulers are stepped by the module, as always with manual optimization
  (``self.lr_schedulers().step()``, e.g. in ``on_train_epoch_end``).
* Strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ...). FSDP, DeepSpeed and
  model-parallel strategies shard the parameters, which samfast does not support yet.

This module imports no Lightning package: it works with whichever the module comes from.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..distributed import _sam_step, sam_optimizer
from ..schedule import SwitchSchedule

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy",
                       "XLAStrategy", "XLAFSDPStrategy")


def sam_training_step(module, loss_fn: Callable[..., Tensor], *, ascent: str = "global",
                      accumulation_steps: int | None = None, clip_grad_norm: float | None = None,
                      clip_ascent: bool = False, schedule: SwitchSchedule | None = None,
                      optimizer=None) -> Tensor:
    """One SAM step (or a base step in an SGD phase) inside a LightningModule's
    ``training_step`` under manual optimization; returns the first-pass loss, detached.

    ``loss_fn``, ``ascent``, ``accumulation_steps``, ``clip_grad_norm`` and ``clip_ascent`` are
    :func:`samfast.distributed.sam_step`'s: ``loss_fn()`` runs the forward pass of the batch
    (``loss_fn(i)`` of micro-batch i with ``accumulation_steps``). The second pass leaves the
    module's BatchNorm running statistics alone.

    ``schedule``: a :class:`samfast.SwitchSchedule` applied by ``trainer.current_epoch``. A
    switch happens when the optimizer's phase differs from the epoch's, so a run resumed
    from a checkpoint taken inside a switch epoch does not switch (or reset momentum) twice.

    ``optimizer``: the SAM to step, when ``configure_optimizers`` returns several.
    """
    if getattr(module, "automatic_optimization", True):
        raise RuntimeError("sam_training_step needs manual optimization: set "
                           "self.automatic_optimization = False in the LightningModule")
    trainer = module.trainer
    strategy = trainer.strategy
    sharded = [c.__name__ for c in type(strategy).__mro__ if c.__name__ in _SHARDED_STRATEGIES]
    if sharded:
        raise RuntimeError(f"sam_training_step does not support {sharded[0]}: samfast does not "
                           "handle sharded parameters yet (use a single device or DDP)")
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, (list, tuple)):
            raise ValueError("Invalid optimizer: configure_optimizers returned several; pass "
                             "optimizer= (the SAM to step)")
    sam = sam_optimizer(optimizer)
    if schedule is not None:
        epoch = trainer.current_epoch
        if sam.sam_enabled != schedule.sam_at(epoch):
            schedule.apply(sam, epoch)
    # The hooks LightningOptimizer.step calls around a step: they count it in global_step.
    before = getattr(optimizer, "_on_before_step", None)
    after = getattr(optimizer, "_on_after_step", None)
    if before is None or after is None:
        raise RuntimeError("sam_training_step: the optimizer is not a LightningOptimizer with "
                           "progress hooks (pass self.optimizers(), or this Lightning version "
                           "is not supported)")
    ddp = strategy.model if isinstance(strategy.model, DistributedDataParallel) else None
    # The precision plugin scales the loss in manual_backward under "16-mixed"; SAM's steps
    # unscale with the same scaler.
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    before()
    loss = _sam_step(module, sam, loss_fn, ascent=ascent, grad_scaler=scaler,
                     accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm,
                     clip_ascent=clip_ascent, backward=module.manual_backward, ddp=ddp,
                     bn_model=module)
    after()
    return loss
