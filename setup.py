"""Installs ``gateloop_kernels`` and ``reversible``.

The C++/CUDA extension of ``reversible`` (``reversible._C``, library ``revkern``, sources in
``csrc/reversible/``, installed with the package as ``reversible/csrc/``) is optional:
the packages work without it (pure PyTorch fallback, or a JIT build on first use), so
installation succeeds on machines without a compiler, CUDA, or torch at build time.

* torch importable at build time (``pip install --no-build-isolation``), nvcc found and torch a
  CUDA build: a CUDA extension (CPU + CUDA kernels);
* torch importable, no nvcc or a CPU build of torch: a C++-only extension (CPU kernels);
* torch not importable (e.g. an isolated build env) or the build fails: no extension, a note.

``REVERSIBLE_BUILD_EXTENSION=0`` skips it; ``REVERSIBLE_BUILD_CUDA=0`` builds the C++-only one.
"""
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc/reversible"  # the revkern extension's sources (setuptools wants a relative path)


def _off(var):
    return os.environ.get(var, "1").strip().lower() in ("0", "off", "false", "no")


def _revkern_extension():
    """``(ext_modules, cmdclass)`` for ``reversible._C``, or ``([], {})`` where it cannot be built."""
    if _off("REVERSIBLE_BUILD_EXTENSION"):
        print("[setup] reversible._C: skipped (REVERSIBLE_BUILD_EXTENSION=0)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # no torch in the build environment
        print(f"[setup] reversible._C: skipped, torch not importable at build time ({type(e).__name__}: {e}); "
              "the PyTorch path (or a JIT build on first use) will be used")
        return [], {}

    sources = [f"{CSRC}/revkern_ops.cpp"]
    kwargs = dict(include_dirs=[os.path.join(HERE, CSRC)], define_macros=[("REVKERN_PYTHON_MODULE", None)])
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and nvcc is not None
                and os.path.exists(nvcc) and not _off("REVERSIBLE_BUILD_CUDA"))
    if use_cuda:
        ext = CUDAExtension("reversible._C", sources + [f"{CSRC}/revkern_cuda.cu"],
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
                            **kwargs)
    else:
        ext = CppExtension("reversible._C", sources, extra_compile_args={"cxx": ["-O3"]}, **kwargs)
    print(f"[setup] reversible._C: building the {'CUDA' if use_cuda else 'C++-only'} extension")

    class OptionalBuildExt(BuildExtension):
        """Never fails the install: a failed build leaves the package on its fallback paths."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # e.g. no usable compiler at all
                print(f"[setup] reversible._C: build FAILED ({type(e).__name__}: {e}); installing without it")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                print(f"[setup] reversible._C: build FAILED ({type(e).__name__}: {e}); installing without it")

        def copy_extensions_to_source(self):  # editable installs
            try:
                super().copy_extensions_to_source()
            except Exception as e:
                print(f"[setup] reversible._C: not copied into the source tree ({e})")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _revkern_extension()

setup(
    name="gateloop-kernels",
    version="0.1.0",
    description="Fused Triton kernels for the GateLoop scan and a reversible-network library for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gateloop_kernels", "gateloop_kernels.*", "reversible", "reversible.*"])
    + ["reversible.csrc"],
    # the extension's sources travel inside the package, where reversible._extension's JIT build finds them
    package_dir={"reversible.csrc": CSRC},
    package_data={"reversible.csrc": ["*.h", "*.cuh", "*.cpp", "*.cu"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "einops>=0.7", "numpy"],
    extras_require={
        # the upstream package is the oracle of the drop-in layers (its tests skip without it)
        "test": ["pytest>=7", "hypothesis>=6", "gateloop-transformer==0.2.5", "rotary-embedding-torch"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
