"""Test set-up. Without a GPU, the Triton kernels run on CPU tensors under Triton's
interpreter; that switch must be set before anything imports triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def training_passes(monkeypatch) -> list:
    """A list that gets one entry per training-mode forward pass of every model the CIFAR
    trainer builds (samfast.cifar.train.build_model patched for the test)."""
    from samfast.cifar import train as trainer
    passes: list[int] = []
    build = trainer.build_model

    def counting_model(*a, **k):
        model = build(*a, **k)
        model.register_forward_pre_hook(lambda m, inp: passes.append(1) if m.training else None)
        return model
    monkeypatch.setattr(trainer, "build_model", counting_model)
    return passes
