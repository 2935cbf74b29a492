"""What `pip install .` gives: the wheel holds every module and config, and every README command works
from a non-editable install run outside the checkout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import polars as pl
import pytest
from cli import run_cli, venv_without_the_project, without_pythonpath

from job.samples import write_video

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("src", "configs", "pyproject.toml", "setup.py", "README.md")


def copy_of_the_project(destination: Path) -> Path:
    """The files a build reads, copied so that building leaves nothing (build/) in the checkout."""
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, destination / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, destination / name)
    return destination


def expected_files() -> set[str]:
    """Every module under src/job/ and every config under configs/, as paths inside the wheel."""
    modules = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src" / "job").rglob("*.py")}
    configs = {"job/configs/" + p.relative_to(REPO / "configs").as_posix()
               for p in (REPO / "configs").rglob("*") if p.suffix in (".py", ".yaml")}
    return modules | configs


def test_the_wheel_holds_every_module_and_every_config(tmp_path):
    source = copy_of_the_project(tmp_path / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("job-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_files()
    assert {"job/report/__main__.py", "job/configs/tracker/bytetrack.yaml"} <= expected
    assert expected - inside == set(), "left out of the wheel"


def test_a_new_subpackage_and_config_group_ship_without_touching_pyproject(tmp_path):
    """The trap of a hand-kept list: what is added to the tree later is found too."""
    source = copy_of_the_project(tmp_path / "source")
    (source / "src" / "job" / "newstage").mkdir()
    (source / "src" / "job" / "newstage" / "__init__.py").write_text('"""A stage added later."""\n')
    (source / "configs" / "newgroup").mkdir()
    (source / "configs" / "newgroup" / "preset.yaml").write_text("value: 1\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = (tmp_path / "dist").glob("job-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    assert {"job/newstage/__init__.py", "job/configs/newgroup/preset.yaml"} <= inside


@pytest.mark.slow
def test_every_readme_command_from_a_non_editable_install_outside_the_checkout(tmp_path, weights_path):
    """`pip install .` into a venv that has only the dependencies, then, from a directory that is not the
    checkout: the job with a tracker and the report, `job.report`, `job.compare` and a two-run sweep."""
    python, site = venv_without_the_project(tmp_path / "venv")
    source = copy_of_the_project(tmp_path / "source")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                "--no-build-isolation", "--target", str(site), str(source)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import job; print(job.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True, env=without_pythonpath())
    assert where.stdout.startswith(str(site)), where.stdout
    for i in range(2):
        write_video(tmp_path / "videos" / f"clip{i}.mp4", 12, size=(320, 240))

    def job(*args: str, module: str = "job"):
        return run_cli(*args, module=module, cwd=elsewhere, python=python, timeout=600, env=without_pythonpath())

    common = [f"video_dir={tmp_path / 'videos'}", f"model.weights={weights_path}", "ray.num_cpus=2",
              "ray.num_actors=1"]
    out = tmp_path / "out"
    result = job(*common, f"output_dir={out}", "score_threshold=0.25", "report=true", "tracker=bytetrack",
                 # the library's defaults but the two score thresholds, lowered to the test model's scores
                 "+tracker.params.track_activation_threshold=0.3", "+tracker.params.high_conf_det_threshold=0.35")
    assert result.returncode == 0, result.output[-3000:]
    assert pl.read_parquet(out / "videos.parquet")["status"].to_list() == ["ok", "ok"]
    assert len(list(out.glob("tracks/video_id=*/tracks.parquet"))) == 2
    assert pl.read_parquet(out / "track_summary.parquet").height > 0
    assert (out / "report" / "index.html").exists()
    shutil.rmtree(out / "report")
    report = job(f"output_dir={out}", module="job.report")
    assert report.returncode == 0, report.output[-3000:]
    assert (out / "report" / "index.html").exists()

    sweep = tmp_path / "sweep"
    result = job("-m", *common, f"output_dir={sweep}", "score_threshold=0.25,0.35")
    assert result.returncode == 0, result.output[-3000:]
    manifests = sorted(sweep.glob("*/manifest.json"))
    assert [json.loads(p.read_text())["settings"]["score_threshold"] for p in manifests] == [0.25, 0.35]
    compare = job(str(sweep), module="job.compare")
    assert compare.returncode == 0, compare.output[-3000:]
    assert "score_threshold=0.25" in compare.output and "score_threshold=0.35" in compare.output
