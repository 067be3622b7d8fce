"""Build script: package metadata lives in pyproject.toml; this file only adds the optional
``samfast._C`` extension once ``csrc/`` has sources (``SAMFAST_NO_EXT=1`` skips it)."""

import glob
import os

from setuptools import setup


def extension_kwargs() -> dict:
    sources = sorted(glob.glob("csrc/*.cpp"))
    if os.environ.get("SAMFAST_NO_EXT") == "1" or not sources:
        return {}
    from torch.utils import cpp_extension

    ext = cpp_extension.CppExtension("samfast._C", sources,
                                     extra_compile_args={"cxx": ["-O3"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**extension_kwargs())
