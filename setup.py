"""Build script for MambaByte.

The pure-Python package always installs. When a CUDA build of torch and nvcc are both present (and
``MAMBABYTE_SKIP_CUDA_BUILD`` is not set) the selective-scan / conv / decode kernels in ``csrc/`` are
compiled into ``mambabyte._C``. ``MAMBABYTE_CUDA_ARCH_LIST`` (e.g. "9.0" or "8.0;9.0") picks the target
architectures; by default the local GPU's. Without a compiler the package falls back to a JIT build on
first use, and finally to the pure PyTorch path (see ``mambabyte doctor``).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    if os.environ.get("MAMBABYTE_SKIP_CUDA_BUILD"):
        print("mambabyte: MAMBABYTE_SKIP_CUDA_BUILD set, not building CUDA kernels", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not any(s.endswith(".cu") for s in sources):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env: pure-Python install
        print(f"mambabyte: torch not importable at build time ({exc}); CUDA kernels not built", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None and not CUDA_HOME:
        print("mambabyte: no CUDA torch or nvcc; installing the pure-PyTorch package", file=sys.stderr)
        return [], {}
    from mambabyte_build import cuda_build_flags  # noqa: E402  (local helper next to setup.py)

    arch_flags = cuda_build_flags()
    ext = CUDAExtension(
        name="mambabyte._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": arch_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


sys.path.insert(0, HERE)
ext_modules, cmdclass = _cuda_extensions()

setup(
    name="mambabyte",
    version="0.1.0",
    description="Token-free byte-level language modelling with Mamba: train, generate, keep state, look inside",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the shipped models live in pretrained_models/ at the top of the repo; they are installed inside the
    # package as mambabyte/pretrained_models so that a wheel (not only an editable install) finds them
    packages=find_packages(include=["mambabyte", "mambabyte.*"]) + ["mambabyte.pretrained_models"],
    package_dir={"mambabyte.pretrained_models": "pretrained_models"},
    package_data={"mambabyte.pretrained_models": ["*/*.json", "*/*.safetensors", "*/README.md", "README.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7", "tokenizers"],
        "hf": ["datasets", "huggingface_hub"],
        "subword": ["tokenizers"],
    },
    entry_points={
        "console_scripts": [
            "mambabyte=mambabyte.cli.main:main",
            "extract_module_outputs.py=mambabyte.cli.extract:main_module_outputs",
            "extract_discrete_A.py=mambabyte.cli.extract:main_discrete_A",
            "extract_input_sim_with_discrete_A.py=mambabyte.cli.extract:main_input_sim",
            "mambabyte-generate=mambabyte.cli.generate:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
