"""Build script for dla_fast.

The pure-Python package (eager models, Triton kernels) installs everywhere. Install torch first and use
`--no-build-isolation`, so the build sees that torch and does not fetch a second one.
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "dla_fast", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="dla_fast",
    version=read_version(),
    description="Fast, exact Deep Layer Aggregation (DLA) networks: reference models and fused Triton/CUDA kernels",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dla_fast", "dla_fast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "timm>=1.0", "torchvision"],
        "build": ["ninja", "pybind11"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["dla-fast=dla_fast.__main__:main"]},
)
