"""Build script: the package metadata lives in pyproject.toml; this file only adds the C++/CUDA extensions."""
from setuptools import setup

setup()
