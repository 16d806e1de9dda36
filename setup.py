"""Build of turbo-kernels: pure Python, plus the CUDA extension turbo_kernels._C when it can be built.

Environment knobs:
  TURBO_KERNELS_BUILD_CUDA  unset/"auto": build when a CUDA-enabled torch and nvcc are present,
                            and fall back to pure Python (saying why) if the build fails;
                            "1": build, and fail the install if that is impossible or fails;
                            "0": never build.
  CUDA_HOME                 the CUDA toolkit (default: /usr/local/cuda when it holds nvcc).
  TORCH_CUDA_ARCH_LIST      target architectures (default "9.0+PTX").
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build).
"""

import glob
import os
import sys

from setuptools import setup

BUILD_CUDA = os.environ.get("TURBO_KERNELS_BUILD_CUDA", "auto").strip().lower()
STANDARD_CUDA_HOME = "/usr/local/cuda"


def _say(message: str) -> None:
    print(f"turbo-kernels setup: {message}", file=sys.stderr)


def _find_cuda_home():
    # torch guesses the toolkit from the first `nvcc` on PATH, which may be a wrapper script whose
    # parent is not a toolkit (then linking -lcudart fails): prefer CUDA_HOME, then the standard path.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), STANDARD_CUDA_HOME):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _cuda_extension_setup():
    """(ext_modules, cmdclass) for the CUDA build, or ([], {}) with the reason printed."""
    if BUILD_CUDA == "0":
        _say("TURBO_KERNELS_BUILD_CUDA=0: installing pure Python (Triton and reference backends only)")
        return [], {}
    cuda_home = _find_cuda_home()
    reason = None
    try:
        import torch
    except ImportError:
        reason = "torch is not installed in the build environment"
    else:
        if torch.version.cuda is None:
            reason = "this torch is a CPU-only build"
        elif cuda_home is None:
            reason = "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)"
    if reason:
        if BUILD_CUDA == "1":
            raise RuntimeError(f"TURBO_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"not building the CUDA extension: {reason}; installing pure Python")
        return [], {}

    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # computed at import; make sure it is the toolkit found above

    class BuildExtension(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:
                if BUILD_CUDA == "1":
                    raise
                _say(f"building the CUDA extension failed ({exc}); installing pure Python")

    _say(f"building the CUDA extension with {cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    extension = cpp_extension.CUDAExtension(
        name="turbo_kernels._C",
        sources=sources,
        # No -std flag: torch's build adds the C++ standard its headers need (C++20 from torch 2.13 on).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
