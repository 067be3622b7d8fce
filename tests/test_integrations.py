"""samfast in PyTorch Lightning, Hugging Face Accelerate and the transformers Trainer, each
against the plain samfast loop on the same data (float64 where the framework allows, else the
same autocast), and the README's "Use it with" snippets (tests/use_it_with.py) run as written.

Run as a script (``python tests/test_integrations.py OUT``) it is the Lightning DDP run of
test_lightning_ddp_equals_the_full_batch_loop: ``strategy="ddp"`` re-executes this script for
the second rank.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import samfast
from samfast.distributed import sam_optimizer, sam_step

import use_it_with

ROOT = Path(__file__).resolve().parents[1]
OPT = dict(lr=0.05, momentum=0.9)  # the snippets' hyper-parameters
FRAMEWORKS = ("pytorch_lightning", "lightning", "lightning_fabric", "accelerate", "transformers")


def make_net(bn=True, dtype=torch.float64):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(),
                                                                         nn.Linear(16, 4)]
    return nn.Sequential(*layers).to(dtype)


def make_data(n=64, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(n, 6, generator=gen, dtype=dtype),
                         torch.randint(0, 4, (n,), generator=gen))


def loader_of(data, batch_size=16):
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def loss_fn_of(model, x, y, k=None, amp=None):
    """The batch's loss function for sam_step: loss_fn(), or loss_fn(i) of k micro-batches."""
    def loss(xi, yi):
        if amp is None:
            return F.cross_entropy(model(xi), yi)
        with torch.autocast("cpu", dtype=amp):
            return F.cross_entropy(model(xi), yi)
    if k is None:
        return lambda: loss(x, y)
    micro = list(zip(x.chunk(k), y.chunk(k)))
    return lambda i: loss(*micro[i])


def plain_run(model, loader, epochs, sam_start, *, k=None, clip=None, amp=None, scaler=None,
              step_lr=False):
    """The plain samfast loop: the reference every framework's result must equal."""
    opt = samfast.SAM(model.parameters(), **OPT)
    lr = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5) if step_lr else None
    schedule = samfast.SwitchSchedule(epochs, sam_start=sam_start)
    for epoch in range(epochs):
        schedule.apply(opt, epoch)
        for x, y in loader:
            sam_step(model, opt, loss_fn_of(model, x, y, k, amp), grad_scaler=scaler,
                     accumulation_steps=k, clip_grad_norm=clip)
        if lr is not None:
            lr.step()
    return opt


def assert_same_state(a: dict, b: dict, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def state_of(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- the core imports no framework ------------------------------------------------------------------

def test_import_samfast_imports_no_framework():
    code = ("import sys, samfast, samfast.distributed, samfast.integrations.lightning, "
            "samfast.integrations.accelerate\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- the README snippets are the tested code ---------------------------------------------------------

def snippets_of_module() -> list[str]:
    text = Path(use_it_with.__file__).read_text()
    blocks = re.findall(r"\n( +)# snippet: \w+\n(.*?)\n +# end snippet", text, re.S)
    return [textwrap.dedent(body).strip() for _, body in blocks]


def test_readme_use_it_with_blocks_are_the_tested_snippets():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\n## Use it with\n(.*?)(?=\n## |\Z)", readme, re.S)
    if section is None:
        pytest.skip("README.md has no 'Use it with' section yet (docs_use_it_with.md)")
    blocks = [b.strip() for b in re.findall(r"```python\n(.*?)```", section.group(1), re.S)]
    assert blocks == snippets_of_module()


def test_plain_snippet_equals_the_full_batch_loop():
    epochs = 4
    reference = make_net(bn=False)  # BatchNorm would see the snippet's micro-batches of 4
    net = make_net(bn=False)
    use_it_with.plain_loop(net, loader_of(make_data()), epochs)
    plain_run(reference, loader_of(make_data()), epochs, epochs // 2, clip=1.0)
    assert_same_state(state_of(net), state_of(reference))


# -- PyTorch Lightning --------------------------------------------------------------------------------

@functools.cache
def lightning_module_class():
    pl = pytest.importorskip("pytorch_lightning")
    from samfast.integrations.lightning import sam_training_step

    class LitNet(pl.LightningModule):
        """Every option of sam_training_step, with an LR scheduler stepped per epoch."""

        def __init__(self, net, epochs, sam_start, k=None, clip=None, ascent="global"):
            super().__init__()
            self.net, self.k, self.clip, self.ascent = net, k, clip, ascent
            self.schedule = samfast.SwitchSchedule(epochs, sam_start=sam_start)
            self.automatic_optimization = False

        def configure_optimizers(self):
            opt = samfast.SAM(self.parameters(), **OPT)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return sam_training_step(self, loss_fn_of(self.net, x, y, self.k),
                                     ascent=self.ascent, accumulation_steps=self.k,
                                     clip_grad_norm=self.clip, schedule=self.schedule)

        def on_train_epoch_end(self):
            self.lr_schedulers().step()

    return pl, LitNet


def quiet_trainer(pl, tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(default_root_dir=tmp_path, **{**defaults, **kwargs})


def test_lightning_snippet_equals_the_plain_loop(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_lightning")
    monkeypatch.chdir(tmp_path)  # the snippet's Trainer writes logs and checkpoints to the cwd
    epochs = 3
    net = make_net()
    trainer = use_it_with.lightning_fit(net, loader_of(make_data()), epochs)
    reference = make_net()
    plain_run(reference, loader_of(make_data()), epochs, 1)
    assert trainer.global_step == epochs * 4  # SAM steps count as optimizer steps
    assert_same_state(state_of(net), state_of(reference))


def test_lightning_fit_and_resume_equal_the_plain_loop(tmp_path):
    """BatchNorm, the switch at epoch 1, 2 micro-batches, clipping and a StepLR; then a fresh
    Trainer resumed from the checkpoint of epoch 1 ends where the uninterrupted fit ended."""
    pl, LitNet = lightning_module_class()
    from pytorch_lightning.callbacks import ModelCheckpoint
    epochs, options = 4, dict(sam_start=1, k=2, clip=0.5)
    net = make_net()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer = quiet_trainer(pl, tmp_path, max_epochs=epochs, enable_checkpointing=True,
                            callbacks=[checkpoints])
    trainer.fit(LitNet(net, epochs, **options), loader_of(make_data()))
    reference = make_net()
    opt = plain_run(reference, loader_of(make_data()), epochs, 1, k=2, clip=0.5, step_lr=True)
    assert_same_state(state_of(net), state_of(reference))  # BatchNorm buffers included
    assert trainer.global_step == 16

    ckpt = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["optimizer_states"][0]["samfast"]["sam_enabled"] is True
    resumed = make_net()
    quiet_trainer(pl, tmp_path, max_epochs=epochs).fit(
        LitNet(resumed, epochs, **options), loader_of(make_data()), ckpt_path=ckpt)
    assert_same_state(state_of(resumed), state_of(net), rtol=0, atol=0)  # bitwise
    assert opt.skipped_steps == 0


def test_lightning_bf16_mixed_equals_the_plain_autocast_loop(tmp_path):
    pl, LitNet = lightning_module_class()
    epochs = 2
    net = make_net(dtype=torch.float32)
    data = make_data(dtype=torch.float32)
    quiet_trainer(pl, tmp_path, max_epochs=epochs, precision="bf16-mixed").fit(
        LitNet(net, epochs, sam_start=1), loader_of(data))
    reference = make_net(dtype=torch.float32)
    plain_run(reference, loader_of(data), epochs, 1, amp=torch.bfloat16, step_lr=True)
    assert_same_state(state_of(net), state_of(reference), rtol=1e-6, atol=1e-6)


def test_lightning_fp16_with_the_precision_plugins_scaler(tmp_path):
    """"16-mixed" (the plugin given explicitly: Lightning turns the flag into bf16 on a CPU):
    manual_backward scales, SAM's steps unscale with the plugin's scaler, update() once a
    step (growth every 3 steps shows the count)."""
    pl, LitNet = lightning_module_class()
    from pytorch_lightning.plugins.precision import MixedPrecision
    epochs = 2

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    net = make_net(dtype=torch.float32)
    data = make_data(dtype=torch.float32)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler())
    quiet_trainer(pl, tmp_path, max_epochs=epochs, plugins=[plugin]).fit(
        LitNet(net, epochs, sam_start=1), loader_of(data))
    reference, ref_scaler = make_net(dtype=torch.float32), scaler()
    plain_run(reference, loader_of(data), epochs, 1, amp=torch.float16, scaler=ref_scaler,
              step_lr=True)
    assert plugin.scaler.get_scale() == ref_scaler.get_scale() == 2.0 ** 8 * 2 ** (8 // 3)
    assert_same_state(state_of(net), state_of(reference), rtol=1e-6, atol=1e-6)


def _count_allreduces(calls: list, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    calls.append(1)
    return default_hooks.allreduce_hook(None, bucket)


def _lightning_ddp_main(out: str) -> None:
    """Both ranks of the Lightning DDP test (Lightning launches rank 1 by re-running this)."""
    pl, LitNet = lightning_module_class()
    torch.set_num_threads(1)
    epochs = 3
    net = make_net(bn=False)  # per-rank BatchNorm statistics would differ from the full batch
    # Rank r takes samples r, r+2, ...: a step's two shards of 8 are the plain loop's batch of
    # 16. (Lightning's own DistributedSampler would shuffle them.)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning for the rank it launches
    data = make_data()
    loader = DataLoader(data, batch_size=8, sampler=list(range(rank, len(data), 2)))
    trainer = quiet_trainer(pl, out, max_epochs=epochs, devices=2, strategy="ddp",
                            use_distributed_sampler=False)
    allreduces = []

    class Counted(LitNet):
        def on_train_start(self):
            self.trainer.strategy.model.register_comm_hook(allreduces, _count_allreduces)
    trainer.fit(Counted(net, epochs, sam_start=1, k=2, clip=0.5), loader)
    torch.save({"state": state_of(net), "global_step": trainer.global_step,
                "allreduces": len(allreduces)}, os.path.join(out, f"rank{trainer.global_rank}.pt"))


def test_lightning_ddp_equals_the_full_batch_loop(tmp_path):
    """strategy="ddp", 2 CPU processes (gloo), 8 samples per rank and step, 2 micro-batches
    each, clipping: global ascent equals single-process SAM on the batch of 16."""
    pytest.importorskip("pytorch_lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["global_step"] for r in ranks] == [12, 12]
    # one all-reduce per pass (one bucket): 4 SGD steps, then 8 SAM steps of two passes; the
    # first micro-batch of each pass ran in no_sync
    assert [r["allreduces"] for r in ranks] == [4 + 8 * 2] * 2
    assert_same_state(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    reference = make_net(bn=False)
    plain_run(reference, loader_of(make_data()), 3, 1, k=2, clip=0.5, step_lr=True)
    assert_same_state(ranks[0]["state"], state_of(reference))


# -- Hugging Face Accelerate and the transformers Trainer ----------------------------------------------

@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: reset them around each test."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_snippet_bf16_equals_the_plain_autocast_loop(fresh_accelerate_state):
    epochs = 2
    data = make_data(dtype=torch.float32)
    net = make_net(dtype=torch.float32)
    accelerator, opt = use_it_with.accelerate_loop(net, loader_of(data), epochs)
    reference = make_net(dtype=torch.float32)  # the snippet has no schedule: SAM throughout
    plain_run(reference, loader_of(data), epochs, 0, amp=torch.bfloat16, clip=1.0)
    assert_same_state(state_of(accelerator.unwrap_model(net)), state_of(reference),
                      rtol=1e-6, atol=1e-6)
    # the AcceleratedOptimizer forwards state_dict (with samfast's entry) to the SAM
    state = opt.state_dict()
    assert state["samfast"]["sam_enabled"] is True
    fresh = samfast.SAM(make_net(dtype=torch.float32).parameters(), **OPT)
    fresh.load_state_dict(state)
    assert sam_optimizer(opt) is not opt and not hasattr(opt, "first_step")


def test_accelerate_micro_batches_and_clip_equal_the_plain_loop(fresh_accelerate_state):
    from accelerate import Accelerator
    from samfast.integrations.accelerate import sam_step as accelerate_sam_step
    epochs = 3
    accelerator = Accelerator(cpu=True)
    net = make_net()
    model, opt, loader = accelerator.prepare(net, samfast.SAM(net.parameters(), **OPT),
                                             loader_of(make_data()))
    schedule = samfast.SwitchSchedule(epochs, sam_start=1)
    for epoch in range(epochs):
        schedule.apply(sam_optimizer(opt), epoch)
        for x, y in loader:
            accelerate_sam_step(accelerator, model, opt, loss_fn_of(model, x, y, 2),
                                accumulation_steps=2, clip_grad_norm=0.5)
    reference = make_net()
    plain_run(reference, loader_of(make_data()), epochs, 1, k=2, clip=0.5)
    assert_same_state(state_of(net), state_of(reference))

    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        accelerator.gradient_accumulation_steps = 2
        accelerate_sam_step(accelerator, model, opt, loss_fn_of(model, x, y))


def test_accelerate_fp16_unscales_with_the_accelerators_scaler(fresh_accelerate_state):
    """Accelerate makes fp16 a no-op on a CPU (no autocast, no scaler), so the accelerator is
    handed the GradScaler it makes on a GPU: accelerator.backward scales with it, the SAM
    steps unscale, update() runs once a step (growth every 3 steps shows the count)."""
    from accelerate import Accelerator
    from samfast.integrations.accelerate import sam_step as accelerate_sam_step

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = scaler()
    data = make_data(dtype=torch.float32)
    net = make_net(dtype=torch.float32)
    model, opt, loader = accelerator.prepare(net, samfast.SAM(net.parameters(), **OPT),
                                             loader_of(data))
    for x, y in loader:
        accelerate_sam_step(accelerator, model, opt, lambda: F.cross_entropy(model(x), y),
                            clip_grad_norm=0.5)
    reference, ref_scaler = make_net(dtype=torch.float32), scaler()
    plain_run(reference, loader_of(data), 1, 0, scaler=ref_scaler, clip=0.5)
    assert accelerator.scaler.get_scale() == ref_scaler.get_scale() == 2.0 ** 9
    assert_same_state(state_of(net), state_of(reference), rtol=1e-6, atol=1e-7)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double()


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=16):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, 50, (n, 8), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_hf_trainer_snippet_equals_the_plain_loop(tmp_path, fresh_accelerate_state):
    """A 2-layer BERT built from a config (no download). One batch of 16 per epoch, so the
    Trainer's shuffling only reorders a mean; SAM from epoch 1; the Trainer clips the descent
    gradient (max_grad_norm=1), as sam_step's clip_grad_norm does."""
    epochs = 4
    model = tiny_bert()
    data = TokenData()
    trainer = use_it_with.hf_trainer(model, data, str(tmp_path), epochs)
    reference = tiny_bert()
    opt = samfast.SAM(reference.parameters(), **OPT)
    schedule = samfast.SwitchSchedule(epochs, sam_start=1)
    batch = {"input_ids": data.ids, "labels": data.labels}
    for epoch in range(epochs):
        schedule.apply(opt, epoch)
        sam_step(reference, opt, lambda: reference(**batch).loss, clip_grad_norm=1.0)
    assert trainer.state.global_step == epochs
    assert trainer.sam.sam_enabled and trainer.sam.skipped_steps == 0
    assert_same_state(state_of(model), state_of(reference), rtol=1e-9, atol=1e-10)
    # what the Trainer checkpoints is the SAM's state_dict, samfast's entry included
    state = trainer.optimizer.state_dict()
    assert state["samfast"]["sam_enabled"] is True
    fresh = samfast.SAM(tiny_bert().parameters(), **OPT)
    fresh.load_state_dict(state)
    assert fresh.sam_enabled


def test_hf_trainer_resumes_from_its_checkpoint(tmp_path, fresh_accelerate_state):
    """The Trainer's own checkpoint of epoch 2 (SAM on since epoch 1), resumed by a fresh
    SAMTrainer for the last 2 epochs, ends where the uninterrupted run ended."""
    from transformers import TrainingArguments
    from samfast.integrations.accelerate import SAMTrainer
    from accelerate.state import AcceleratorState, GradientState
    epochs = 4

    def train(model, out, resume=None):
        opt = samfast.SAM(model.parameters(), **OPT)
        args = TrainingArguments(str(out), num_train_epochs=epochs, max_grad_norm=1.0,
                                 lr_scheduler_type="constant", per_device_train_batch_size=16,
                                 report_to="none", save_strategy="epoch", disable_tqdm=True)
        trainer = SAMTrainer(model=model, args=args, train_dataset=TokenData(),
                             optimizers=(opt, None),
                             sam_schedule=samfast.SwitchSchedule(epochs, sam_start=1))
        trainer.train(resume_from_checkpoint=resume)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return trainer
    whole = tiny_bert()
    train(whole, tmp_path / "whole")
    resumed = tiny_bert()
    trainer = train(resumed, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert trainer.state.global_step == epochs and trainer.sam.sam_enabled
    assert_same_state(state_of(resumed), state_of(whole), rtol=0, atol=0)


def test_hf_trainer_refuses_gradient_accumulation(tmp_path, fresh_accelerate_state):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments
    from samfast.integrations.accelerate import SAMTrainer
    model = tiny_bert()
    args = TrainingArguments(str(tmp_path), gradient_accumulation_steps=2, report_to="none")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SAMTrainer(model=model, args=args, train_dataset=TokenData(),
                   optimizers=(samfast.SAM(model.parameters(), **OPT), None))



def test_hf_trainer_refuses_a_sam_policy(tmp_path, fresh_accelerate_state):
    """Its second pass runs inside training_step and the Trainer clips and steps after it: a
    policy's one-pass steps cannot be taken there, so a policy is refused, not run wrongly."""
    pytest.importorskip("transformers")
    from transformers import TrainingArguments
    from samfast.integrations.accelerate import SAMTrainer
    model = tiny_bert()
    args = TrainingArguments(str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match="SAMTrainer does not support SAM policies"):
        SAMTrainer(model=model, args=args, train_dataset=TokenData(),
                   optimizers=(samfast.SAM(model.parameters(), policy=samfast.Interval(2),
                                           **OPT), None))

if __name__ == "__main__":
    _lightning_ddp_main(sys.argv[1])
