"""Build script.

Packages: `dcgen_quant` (its Triton kernels in `dcgen_quant/kernels/`) plus the top-level folder
`bench/`, installed as `dcgen_quant.bench`. No top-level folder may take the name of an installable
package: a source checkout puts the repository root on sys.path, and a root `kernels/` once
shadowed Hugging Face's `kernels` package, which transformers >= 5.25 imports.

The CUDA library (csrc/) is built by csrc/setup_cuda.py when nvcc is present, for
DCGEN_QUANT_CUDA_ARCHS (default 80;86;89;90a;120a); DCGEN_QUANT_SKIP_CUDA=1 skips it and the
package installs pure-Python (docs/KERNELS.md, "CUDA library", lists the knobs).

No network, no git, no side effects: everything configurable is an environment variable.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, find_packages, setup

PACKAGE_DIRS = {
    "dcgen_quant": "dcgen_quant",
    "dcgen_quant.bench": "bench",
}


def _packages() -> list[str]:
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return packages


def _cuda_build():
    # csrc/ is not a package: load the build helper by path
    path = Path(__file__).resolve().parent / "csrc" / "setup_cuda.py"
    spec = importlib.util.spec_from_file_location("dcgen_quant_setup_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup(
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={"dcgen_quant": ["py.typed"]},
    # optional: without nvcc (or with DCGEN_QUANT_SKIP_CUDA=1) nothing is built
    ext_modules=[Extension("dcgen_quant._C", sources=["csrc/python/bindings.cpp"], optional=True)],
    cmdclass={"build_ext": _cuda_build().BuildExt},
)
