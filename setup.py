"""Which packages and data the wheel holds, found from the tree so none can be forgotten.

The metadata lives in pyproject.toml. `configs/` stays at the top level (the project's layout) and ships
inside the package as `job.configs`, each config group a subpackage, so `pip install .` (not only -e),
a wheel for a cluster image and `ray job submit` all find every Hydra preset.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"


def config_packages() -> list[str]:
    groups = [p for p in sorted(CONFIGS.rglob("*")) if p.is_dir() and p.name != "__pycache__"]
    return ["job.configs", *("job.configs." + ".".join(p.relative_to(CONFIGS).parts) for p in groups)]


packages = find_packages("src", include=["job", "job.*"]) + config_packages()
setup(
    package_dir={"": "src", "job.configs": "configs"},
    packages=packages,
    package_data={package: ["*.yaml", "py.typed"] for package in packages},
)
