"""Dockerfile.gpu: lint with hadolint, and check what the image promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.gpu"


def instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            lines.append((keyword.upper(), rest))
            current = ""
    return lines


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings it)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_pinned_cuda_pytorch_and_runs_the_job():
    steps = instructions()
    (base,) = [rest for keyword, rest in steps if keyword == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and tag and tag != "latest" and "cuda" in tag
    assert ("ENTRYPOINT", '["python", "-m", "job"]') in steps
    for keyword, rest in steps:
        if keyword == "COPY":
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied = {source for keyword, rest in steps if keyword == "COPY" for source in rest.split()[:-1]}
    assert {"pyproject.toml", "setup.py", "src", "configs"} <= copied, "everything the build reads"
    (install,) = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    assert " -e " not in f" {install} ", "a non-editable install, as users of the image get from any index"
    (requirement,) = re.findall(r'"\./\[([^\]]*)\]"', install)
    assert set(requirement.split(",")) >= {"s3", "gcs", "track"}
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(requirement.split(",")) <= set(extras), "every extra the image asks for exists"
