"""__main__: what a user must fix is one line and exit 2; a bug keeps its traceback and exits 1."""

from __future__ import annotations

import subprocess
import sys

from cli import run_cli


def test_an_impossible_value_is_one_line_and_exit_2(tmp_path):
    result = run_cli(f"video_dir={tmp_path}", f"output_dir={tmp_path / 'out'}", "frame_stride=0",
                     f"hydra.run.dir={tmp_path / 'hydra'}")
    assert result.returncode == 2, result.output
    assert "frame_stride must be >= 1, got 0" in result.output and "Traceback" not in result.output


def test_what_hydra_cannot_compose_exits_2_with_hydras_reason(tmp_path):
    """An unknown preset or a value of the wrong type is a setting to fix too, not a bug."""
    for setting, reason in (
        ("tracker=foo", "Could not find 'tracker/foo': choose one of bytetrack, ocsort, sort"),
        ("batch_size=abc", "batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("scor_threshold=0.3", "unknown setting scor_threshold: check its spelling (python -m job --help"),
        ("ray.num_actor=2", "unknown setting ray.num_actor: check its spelling"),
    ):
        result = run_cli(f"video_dir={tmp_path}", f"output_dir={tmp_path / 'out'}", setting,
                         f"hydra.run.dir={tmp_path / 'hydra'}")
        assert result.returncode == 2, result.output
        assert result.output.strip() == result.output.strip().splitlines()[0], f"one line: {result.output}"
        assert reason in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_the_reports_misspelt_key_is_one_line_and_exit_2(tmp_path):
    result = run_cli(f"output_dir={tmp_path}", "preview_second=3", module="job.report")
    assert result.returncode == 2, result.output
    assert result.output.strip() == ("unknown setting preview_second: check its spelling "
                                     "(python -m job.report --help lists the settings)")


def test_a_missing_video_dir_is_one_line_and_exit_2(tmp_path):
    result = run_cli(f"video_dir={tmp_path / 'nope'}", f"output_dir={tmp_path / 'out'}",
                     f"hydra.run.dir={tmp_path / 'hydra'}")
    assert result.returncode == 2, result.output
    assert "does not exist; pass video_dir=" in result.output and "Traceback" not in result.output


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path):
    """A builtin ValueError from inside the job is a bug, not a user error."""
    script = f"""
import runpy, sys
import job.run
def broken(cfg, keep_ray=False):
    raise ValueError("a bug deep inside")
job.run.run = broken
sys.argv = ["job", "video_dir={tmp_path}", "output_dir={tmp_path / 'out'}", "hydra.run.dir={tmp_path / 'hydra'}"]
runpy.run_module("job", run_name="__main__", alter_sys=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" in result.stderr and "ValueError: a bug deep inside" in result.stderr


def test_the_driver_path_imports_neither_torch_nor_ray():
    code = "import sys, job.run; print('torch' in sys.modules, 'ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"], result.stderr
