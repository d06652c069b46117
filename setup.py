"""Build script: the package metadata lives in pyproject.toml; this file only adds the C++/CUDA extensions.

* ``lrtrain.update._cpu``  (csrc/cpu/module.cpp): always; C++17 + OpenMP (``-fopenmp`` at compile and link).
* ``lrtrain.update._cuda`` (csrc/cuda/*.cu + csrc/cuda/binding.cpp): only when the torch that builds it has
  CUDA (``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``).

Build against the torch that will run it: ``pip install --no-build-isolation -e .`` (an isolated build
would fetch another torch). If an extension fails to build, installation fails loudly; importing lrtrain
never needs an extension (``lrtrain.update`` falls back to the pure-PyTorch reference update).
Set ``LRTRAIN_NO_EXT=1`` to install without compiling anything.
"""
import glob
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join("build", "generated")


def _write_constants_header() -> None:
    """build/generated/lrtrain_constants.h from lrtrain/update/constants.py (loaded by path: it imports nothing)."""
    spec = importlib.util.spec_from_file_location("_lrtrain_constants", os.path.join(HERE, "lrtrain", "update", "constants.py"))
    constants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constants)
    os.makedirs(os.path.join(HERE, GENERATED), exist_ok=True)
    path = os.path.join(HERE, GENERATED, "lrtrain_constants.h")
    text = constants.c_header()
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _extensions():
    if os.environ.get("LRTRAIN_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not importable at build time: pure-Python install (reference path only)
        return [], {}
    _write_constants_header()
    version = [f'-DLRTRAIN_TORCH_VERSION="{torch.__version__}"']
    # hidden visibility: what pybind11 expects of a module (its own types are hidden; only PyInit is exported)
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden"] + version
    exts = [CppExtension("lrtrain.update._cpu", ["csrc/cpu/module.cpp"], extra_compile_args=cxx,
                         extra_link_args=["-fopenmp"], include_dirs=[os.path.join(HERE, GENERATED)])]
    if torch.version.cuda and CUDA_HOME:
        cu = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        exts.append(CUDAExtension("lrtrain.update._cuda", cu + ["csrc/cuda/binding.cpp"],
                                  include_dirs=[os.path.join(HERE, GENERATED)],
                                  extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fvisibility=hidden"] + version,
                                                      "nvcc": ["-O3", "-std=c++17"] + version}))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
