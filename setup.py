"""Builds the optional extension localvol_fast._C (metadata: pyproject.toml; flags: csrc/README.md).

- CUDAExtension (csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/*) when torch is a CUDA build and a CUDA
  toolkit is found (CUDA_HOME, /usr/local/cuda or nvcc on PATH); else CppExtension (CPU sources only).
- LOCALVOL_SKIP_EXTENSION=1: pure Python.  LOCALVOL_FORCE_CUDA=1: CUDA build or an error.
  LOCALVOL_SKIP_CUDA=1: CPU-only extension even where CUDA is found.
- LOCALVOL_CUDA_ARCHS="9.0;8.0" (default "9.0") sets TORCH_CUDA_ARCH_LIST unless that is already set.
- Without an importable torch (an isolated `pip install .`) the package installs as pure Python.
"""

import glob
import os
import shutil

from setuptools import setup

BUILD_HINT = "to build the compiled ops: pip install --no-build-isolation -e ."


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The CUDA toolkit root, or None: CUDA_HOME / CUDA_PATH, /usr/local/cuda, then nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def extension_modules():
    if env_flag("LOCALVOL_SKIP_EXTENSION"):
        print("localvol_fast: LOCALVOL_SKIP_EXTENSION is set; installing pure Python")
        return [], {}
    force_cuda = env_flag("LOCALVOL_FORCE_CUDA")
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # torch.utils.cpp_extension reads it at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("LOCALVOL_CUDA_ARCHS", "9.0"))
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if force_cuda:
            raise RuntimeError("LOCALVOL_FORCE_CUDA=1 but torch cannot be imported; " + BUILD_HINT)
        print(f"localvol_fast: torch is not importable here (isolated build?); installing pure Python; {BUILD_HINT}")
        return [], {}

    use_cuda = bool(torch.version.cuda) and cuda_home is not None and not env_flag("LOCALVOL_SKIP_CUDA")
    if force_cuda and not use_cuda:
        # Forced past detection: only a CPU build of torch or a contradictory flag make it impossible
        # (a toolkit we did not find is torch.utils.cpp_extension's to find or to report).
        if not torch.version.cuda or env_flag("LOCALVOL_SKIP_CUDA"):
            raise RuntimeError(
                f"LOCALVOL_FORCE_CUDA=1 is impossible: torch {torch.__version__} (CUDA {torch.version.cuda}), "
                f"LOCALVOL_SKIP_CUDA={os.environ.get('LOCALVOL_SKIP_CUDA', '')!r}; install a CUDA build of torch"
            )
        use_cuda = True
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No fast math anywhere: the random stream's logf/sinf/cosf must stay accurate (csrc/philox.h), and no
    # contraction into FMAs, so every CPU path does the same IEEE operations. OpenMP makes
    # at::parallel_for (a header template) really run on several threads.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            "localvol_fast._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"]
        )
    else:
        ext = CppExtension("localvol_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    print(f"localvol_fast: building {'CUDA' if use_cuda else 'CPU-only'} extension ({len(sources)} sources)")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
