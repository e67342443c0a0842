"""Build script.

Packages: `dcgen_quant` plus the top-level folders `kernels/` and `bench/`, installed as
`dcgen_quant.kernels` and `dcgen_quant.bench` (DESIGN.md: no top-level `kernels` package).

No network, no git, no side effects: everything configurable is an environment variable.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "dcgen_quant": "dcgen_quant",
    "dcgen_quant.kernels": "kernels",
    "dcgen_quant.bench": "bench",
}


def _packages() -> list[str]:
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return packages


setup(
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={"dcgen_quant": ["py.typed"]},
)
