"""Build script: package metadata lives in pyproject.toml; this file adds the optional
``samfast._C`` extension (the native backend).

* torch is a CUDA build and a CUDA toolkit is found: ``CUDAExtension`` with csrc/*.cpp and
  csrc/cuda/*.cu, for ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX": A100, H100/H200 and
  PTX for newer cards; fewer archs keep the build short);
* otherwise ``CppExtension`` with the CPU kernels only;
* ``SAMFAST_NO_EXT=1`` skips the extension: samfast then runs on its reference and Triton
  backends, and can JIT-build the extension later (``SAMFAST_JIT=1``).

Install with ``pip install --no-build-isolation .`` so the extension builds against the torch
that is installed.
"""

import glob
import os

from setuptools import setup

# nvcc contracts a + b * c into an FMA by default; -fmad=false keeps the CUDA kernels' rounding
# that of the CPU kernels and of the reference backend's separate torch ops.
NVCC_FLAGS = ["-O3", "-fmad=false"]


def extension_kwargs() -> dict:
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if os.environ.get("SAMFAST_NO_EXT") == "1" or not sources:
        return {}
    # torch derives CUDA_HOME from `which nvcc` when it is unset; a /usr/local/bin/nvcc link
    # then points it at /usr/local, which has no lib64/libcudart. Prefer the real toolkit.
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                and bool(cuda_sources) and os.environ.get("SAMFAST_NO_CUDA") != "1")
    # at::parallel_for is an OpenMP pragma in ATen's headers (AT_PARALLEL_OPENMP builds, as
    # the PyPI wheels are): without -fopenmp the CPU kernels silently run on one thread
    # (measured: the ascent at 16 GB/s with 2 threads vs 33 GB/s for torch's own copy).
    # -fno-wrapv: Python's CFLAGS carry -fwrapv, with which GCC cannot bound the trip count
    # of the blocked reduction loops and leaves them scalar (measured: sum of squares at
    # 3.7 GB/s instead of 35 GB/s on 100k floats in cache).
    # -ffp-contract=off: no fused multiply-adds, so the SSE2/AVX2/AVX-512 builds of a kernel and
    # its streaming-store variant give the same bits (found: GCC contracted the AVX-512
    # streaming fp64 restore + SGD into FMAs, 1 ulp off the other builds).
    # -fno-tree-loop-distribute-patterns: GCC split the ascent's `backup = w` out of its loop
    # into a memmove, an extra pass over w (found in the disassembly).
    cxx = ["-O3", "-fopenmp", "-fno-wrapv", "-ffp-contract=off",
           "-fno-tree-loop-distribute-patterns"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = cpp_extension.CUDAExtension(
            "samfast._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("samfast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**extension_kwargs())
