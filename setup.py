"""Packaging: ``kernels/`` installs as ``saeuron.kernels`` and ``csrc/`` ships as ``saeuron.csrc``.

``saeuron/kernels`` and ``saeuron/csrc`` are symbolic links to the top-level folders, so the source tree,
an editable install and a wheel all see the same package layout. The top-level folders have no
``__init__.py``: run from the repository root, Python must never import them as packages of their own
(``kernels`` is the name of a PyPI package that transformers depends on).

Nothing is compiled at install time: the C++/CUDA sources are built just in time on first use
(``saeuron/extension.py``), so ``pip install .`` works on machines with or without a GPU or nvcc.
"""
from setuptools import setup

setup(
    packages=["saeuron", "saeuron.cli", "saeuron.kernels", "saeuron.csrc", "saeuron.minicanvas", "saeuron.evaluate"],
    package_data={"saeuron.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"], "saeuron.minicanvas": ["assets/**/*"]},
    include_package_data=False,
)
