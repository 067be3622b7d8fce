"""Test set-up. Without a GPU, the Triton kernels run on CPU tensors under Triton's
interpreter; that switch must be set before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
