"""The README's "Use it with" snippets, as the tests run them.

Each function's body between ``# snippet: NAME`` and ``# end snippet`` is, dedented, one code
block of the README section (tests/test_integrations.py checks they are the same text); the
function's arguments are what the snippet takes from its surroundings (your model, data...).
The imports are inside the snippets, so importing this module imports no framework.
"""

# ruff: noqa: E731 (lambdas are the snippets' loss functions)


def plain_loop(model, loader, epochs):
    # snippet: plain
    import torch.nn.functional as F
    import samfast
    from samfast.distributed import sam_step

    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9)
    schedule = samfast.SwitchSchedule(epochs, sam_start=epochs // 2)  # SGD, then SAM
    for epoch in range(epochs):
        schedule.apply(opt, epoch)
        for x, y in loader:
            micro = list(zip(x.chunk(4), y.chunk(4)))  # both passes in 4 micro-batches
            sam_step(model, opt, lambda i: F.cross_entropy(model(micro[i][0]), micro[i][1]),
                     accumulation_steps=4, clip_grad_norm=1.0)  # clips the descent gradient
    # end snippet
    return opt


def ddp_loop(model, loader, epochs):
    # snippet: ddp
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    import samfast
    from samfast.distributed import sam_step

    ddp = DistributedDataParallel(model)  # after init_process_group (torchrun)
    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        for x, y in loader:  # this rank's shard of each batch
            sam_step(ddp, opt, lambda: F.cross_entropy(ddp(x), y), ascent="global")
    # end snippet
    return opt


def lightning_fit(net, loader, epochs):
    # snippet: lightning
    import pytorch_lightning as pl
    import torch.nn.functional as F
    import samfast
    from samfast.integrations.lightning import sam_training_step

    class LitSAM(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.automatic_optimization = False  # sam_training_step runs both passes

        def configure_optimizers(self):
            return samfast.SAM(self.parameters(), lr=0.05, momentum=0.9)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return sam_training_step(self, lambda: F.cross_entropy(self.net(x), y),
                                     schedule=samfast.SwitchSchedule(epochs, sam_start=1))

    trainer = pl.Trainer(max_epochs=epochs)  # also precision="bf16-mixed", strategy="ddp"
    trainer.fit(LitSAM(net), loader)
    # end snippet
    return trainer


def accelerate_loop(model, loader, epochs):
    # snippet: accelerate
    from accelerate import Accelerator
    import torch.nn.functional as F
    import samfast
    from samfast.integrations.accelerate import sam_step

    accelerator = Accelerator(mixed_precision="bf16")
    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for epoch in range(epochs):
        for x, y in loader:
            sam_step(accelerator, model, opt, lambda: F.cross_entropy(model(x), y),
                     clip_grad_norm=1.0)
    # end snippet
    return accelerator, opt


def hf_trainer(model, train_dataset, output_dir, epochs):
    # snippet: hf_trainer
    from transformers import TrainingArguments
    import samfast
    from samfast.integrations.accelerate import SAMTrainer

    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9)
    args = TrainingArguments(output_dir, num_train_epochs=epochs, max_grad_norm=1.0,
                             lr_scheduler_type="constant", per_device_train_batch_size=16,
                             report_to="none")
    trainer = SAMTrainer(model=model, args=args, train_dataset=train_dataset,
                         optimizers=(opt, None),
                         sam_schedule=samfast.SwitchSchedule(epochs, sam_start=1))
    trainer.train()
    # end snippet
    return trainer


def fsdp_loop(model, blocks, loader, epochs, checkpoint_dir):
    # snippet: fsdp
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    import samfast
    from samfast.distributed import sam_step

    for block in blocks:  # after init_process_group (torchrun): shard each block, then the root
        fully_shard(block)
    fully_shard(model)
    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9, backend="reference")
    for epoch in range(epochs):
        for x, y in loader:  # this rank's shard of each batch
            sam_step(model, opt, lambda: F.cross_entropy(model(x), y))
        samfast.fsdp.save(model, opt, f"{checkpoint_dir}/epoch{epoch}")  # sharded (DCP)
    # end snippet
    return opt


def fsdp_resume(model, blocks, checkpoint):
    # snippet: fsdp_resume
    from torch.distributed.fsdp import fully_shard
    import samfast

    for block in blocks:  # a new run: shard the model and build the SAM as before, then load
        fully_shard(block)
    fully_shard(model)
    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9, backend="reference")
    samfast.fsdp.load(model, opt, checkpoint)  # e.g. f"{checkpoint_dir}/epoch{epoch}"
    # end snippet
    return opt
