"""Triton kernels of the ``"triton"`` backend, one module per op family, each kernel beside
its launcher. Importing this package imports triton: set ``TRITON_INTERPRET=1`` before that to
run the kernels on CPU tensors (how CI tests them)."""
