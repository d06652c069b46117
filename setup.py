"""Build script: the package metadata lives in pyproject.toml; this file only adds the C++/CUDA extensions.

* ``lrtrain.ext._cpu``  (csrc/cpu/module.cpp): always; C++17 + OpenMP (``-fopenmp`` at compile and link).
* ``lrtrain.ext._cuda`` (csrc/cuda/*.cu + csrc/cuda/binding.cpp): only when the torch that builds it has
  CUDA (``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``).

Build against the torch that will run it: ``pip install --no-build-isolation -e .`` (an isolated build
would fetch another torch). If an extension fails to build, installation fails loudly; importing lrtrain
never needs an extension (``lrtrain.ext`` falls back to the pure-PyTorch reference update).
Set ``LRTRAIN_NO_EXT=1`` to install without compiling anything.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("LRTRAIN_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not importable at build time: pure-Python install (reference path only)
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    exts = [CppExtension("lrtrain.ext._cpu", ["csrc/cpu/module.cpp"], extra_compile_args=cxx,
                         extra_link_args=["-fopenmp"])]
    if torch.version.cuda and CUDA_HOME:
        cu = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        exts.append(CUDAExtension("lrtrain.ext._cuda", cu + ["csrc/cuda/binding.cpp"],
                                  extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                                      "nvcc": ["-O3", "-std=c++17"]}))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
