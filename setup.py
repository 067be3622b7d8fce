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


def extension_kwargs() -> dict:
    sources = sorted(glob.glob("csrc/*.cpp"))
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
    cxx = ["-O3"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = cpp_extension.CUDAExtension(
            "samfast._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = cpp_extension.CppExtension("samfast._C", sources, extra_compile_args={"cxx": cxx})
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**extension_kwargs())
