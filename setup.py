"""Installs ``gateloop_kernels`` and ``reversible``.

The C++/CUDA extension of ``reversible`` is optional: the packages work without it
(pure PyTorch fallback), so installation succeeds on machines without a compiler or CUDA.
"""
from setuptools import find_packages, setup

setup(
    name="gateloop-kernels",
    version="0.1.0",
    description="Fused Triton kernels for the GateLoop scan and a reversible-network library for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gateloop_kernels", "gateloop_kernels.*", "reversible", "reversible.*", "bench"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "einops>=0.7", "numpy"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "bench": ["matplotlib"],
    },
)
