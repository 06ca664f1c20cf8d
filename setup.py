"""Packaging: ``kernels/`` installs as ``saeuron.kernels`` and ``csrc/`` ships as ``saeuron.csrc``.

Nothing is compiled at install time: the C++/CUDA sources are built just in time on first use
(``saeuron/_build.py``), so ``pip install .`` works on machines with or without a GPU or nvcc.
"""
from setuptools import setup

setup(
    packages=["saeuron", "saeuron.kernels", "saeuron.csrc", "saeuron.minicanvas", "saeuron.evaluate"],
    package_dir={"saeuron": "saeuron", "saeuron.kernels": "kernels", "saeuron.csrc": "csrc"},
    package_data={"saeuron.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"], "saeuron.minicanvas": ["assets/**/*"]},
    include_package_data=False,
)
