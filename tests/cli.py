"""Running the project's commands as a user does: a subprocess, its output, and an environment without
the editable install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, module: str = "job", cwd: Path | None = None, env: dict | None = None,
            timeout: int = 300, python: str | Path = sys.executable) -> subprocess.CompletedProcess:
    """`python -m <module> ARGS`; `.output` is stdout and stderr together."""
    result = subprocess.run([str(python), "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=cwd, env=env)
    result.output = result.stdout + result.stderr
    return result


def venv_without_the_project(env_dir: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a new venv that has every dependency but cannot import `job`.

    It sees this environment's site-packages through a .pth line; the editable install of `job` lives in
    a .pth *file* of that directory, which Python only runs for its own site directories.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "deps.pth").write_text(f"{ours}\n")
    python = env_dir / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch, ray, hydra; import job"], capture_output=True,
                           text=True, timeout=120, cwd=env_dir, env=without_pythonpath())
    assert "No module named 'job'" in probe.stderr, probe.stderr[-2000:]
    return python, site


def without_pythonpath() -> dict[str, str]:
    """This environment less PYTHONPATH, which would let any Python import the checkout's `job`."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
