"""Builds the optional C++/CUDA extension ``adamerge_fast._C``; the package metadata is in pyproject.toml.

* A C++ compiler present: ``CppExtension`` with OpenMP (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``).
* Also CUDA (a ``CUDAExtension`` with ``csrc/cuda/*``, macro ``ADAMERGE_WITH_CUDA``) when torch is a CUDA build,
  nvcc is found (``CUDA_HOME``) and ``ADAMERGE_SKIP_CUDA_BUILD`` is not ``"1"``. ``ADAMERGE_CUDA_ARCHS``
  (e.g. ``"80;90"``) sets the ``-gencode`` flags; without it torch's own choice (``TORCH_CUDA_ARCH_LIST``).
  ``ADAMERGE_CUDA_FAST_MATH=1`` adds ``--use_fast_math`` (approximate ``exp``/``log``/division and flushed
  denormals in every kernel, the softmax entropy included); off by default, because no GPU run has yet checked
  the tolerance tests with it (``make gpu-check`` runs them).
* No compiler, no torch at build time, or a failed compile: a warning is printed and the package is
  installed without the extension (pure Python; the ``reference`` and ``triton`` backends still work).
  ``ADAMERGE_REQUIRE_EXT=1`` turns that failure into an error instead; ``ADAMERGE_REQUIRE_CUDA=1`` also makes a
  build without the CUDA kernels an error (``make gpu-check`` sets both).

Install: ``pip install --no-build-isolation -e .`` (no build isolation: build against the torch installed).
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "adamerge_fast._C"


def _warn(msg: str) -> None:
    line = "=" * 100
    print(f"\n{line}\nWARNING (adamerge_fast): {msg}\n{line}\n", file=sys.stderr, flush=True)


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0]) is not None or shutil.which("c++") is not None


def _openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; the kernels then run single-threaded
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("ADAMERGE_CUDA_ARCHS", "").replace(",", ";").split(";")
    flags = []
    for a in (a.strip().replace(".", "") for a in archs):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.removesuffix("+PTX")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{a},code=compute_{a}"]
    return flags


def _nvcc_flags() -> list[str]:
    """nvcc flags of the CUDA sources: -O3, line info, the arch list, and fast math only when asked for."""
    flags = ["-O3", "-lineinfo", *_cuda_arch_flags()]
    if os.environ.get("ADAMERGE_CUDA_FAST_MATH") == "1":
        flags.append("--use_fast_math")
    return flags


def _extensions_and_cmdclass():
    if os.environ.get("ADAMERGE_SKIP_EXT_BUILD") == "1":
        _warn("ADAMERGE_SKIP_EXT_BUILD=1: building without the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any failure means: no extension
        _warn(f"torch is not importable at build time ({e}); building without the C++ extension")
        return [], {}
    if not _have_cxx():
        _warn("no C++ compiler found; building without the C++ extension (pure-Python backends only)")
        return [], {}

    omp_c, omp_l = _openmp_flags()
    cxx = ["-O3", *omp_c] if sys.platform != "win32" else ["/O2", *omp_c]
    sources = _rel("csrc/ops.cpp") + _rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc")]

    cuda_home = cpp_extension.CUDA_HOME
    want_cuda = torch.version.cuda is not None and os.environ.get("ADAMERGE_SKIP_CUDA_BUILD") != "1"
    if want_cuda and not (
        cuda_home
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc" + (".exe" if sys.platform == "win32" else "")))
    ):
        _warn("torch is a CUDA build but nvcc was not found (set CUDA_HOME); building the CPU extension only")
        want_cuda = False
    if os.environ.get("ADAMERGE_REQUIRE_CUDA") == "1" and not want_cuda:
        why = "torch is not a CUDA build" if torch.version.cuda is None else "nvcc not found or CUDA build turned off"
        raise RuntimeError(f"ADAMERGE_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why}")

    if want_cuda:
        sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
        nvcc = _nvcc_flags()
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources,
            include_dirs=include_dirs,
            define_macros=[("ADAMERGE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=omp_l,
        )
    else:
        ext = cpp_extension.CppExtension(
            EXT_NAME,
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=omp_l,
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the extension when possible; otherwise warn and leave the package pure Python."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                self._failed(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._failed(e)

        def _failed(self, e):
            if os.environ.get("ADAMERGE_REQUIRE_EXT") == "1":
                raise e
            if getattr(self, "_amf_warned", False):  # e.g. the in-place copy of the library that was not built
                return
            self._amf_warned = True
            _warn(
                f"building {EXT_NAME} failed ({type(e).__name__}: {e}); the package is installed without it "
                "and the 'cpu'/'cuda' backends report themselves unavailable. Set ADAMERGE_REQUIRE_EXT=1 to "
                "make this an error."
            )

    return [ext], {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
