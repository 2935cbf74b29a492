"""Hydra sweeps: every combination in its own output_dir, one Ray runtime, compared with job.compare.

Uses model.weights=DEFAULT for real: torchvision's files are put in a private torch hub cache
(TORCH_HOME), the way an air-gapped machine is provisioned, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from torchvision.models import get_model_weights

from job.samples import calibrated_state_dict, scene, write_video

pytestmark = pytest.mark.slow
MODELS = ["ssdlite320_mobilenet_v3_large", "fcos_resnet50_fpn"]


def provision_torch_hub(torch_home: Path) -> None:
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    frames = [scene(i, 128, 96) for i in range(0, 8, 2)]
    for name in MODELS:
        url = get_model_weights(name).DEFAULT.url
        torch.save(calibrated_state_dict(name, frames), checkpoints / url.rsplit("/", 1)[1])


def test_two_by_two_sweep_then_compare(tmp_path):
    provision_torch_hub(tmp_path / "torch")
    write_video(tmp_path / "in" / "clip.mp4", 4, size=(128, 96))
    out = tmp_path / "sweep"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(
        [sys.executable, "-m", "job", "-m", f"model={','.join(MODELS)}", "score_threshold=0.05,0.3",
         f"video_dir={tmp_path / 'in'}", f"output_dir={out}", "frame_stride=2", "ray.num_cpus=2",
         "ray.num_actors=1", "ray.cpus_per_actor=2"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    manifests = sorted(out.glob("*/manifest.json"))
    assert len(manifests) == 4
    seen = set()
    for path in manifests:
        manifest = json.loads(path.read_text())
        settings = manifest["settings"]
        assert path.parent.name == f"frame_stride=2,model={settings['model']},score_threshold={settings['score_threshold']}"
        assert settings["weights"].endswith(f"{settings['model']} DEFAULT")
        assert manifest["totals"]["ok"] == 1 and manifest["totals"]["frames"] == 2
        seen.add((settings["model"], settings["score_threshold"]))
    assert seen == {(m, t) for m in MODELS for t in (0.05, 0.3)}
    assert len({json.loads(p.read_text())["ray_job_id"] for p in manifests}) == 1, "one Ray runtime for the sweep"

    compare = subprocess.run([sys.executable, "-m", "job.compare", str(out)], capture_output=True, text=True,
                             timeout=120)
    assert compare.returncode == 0, compare.stderr
    for name in MODELS:
        assert name in compare.stdout
    from job.compare import per_class_table, runs_table

    runs = runs_table(out)
    assert runs.height == 4 and runs["frames"].to_list() == [2, 2, 2, 2]
    per_class = per_class_table(out)
    label = dict(zip(runs["run"], runs["label"]))
    low = per_class.select(pl.col(label[f"frame_stride=2,model={MODELS[0]},score_threshold=0.05"]).sum()).item()
    high = per_class.select(pl.col(label[f"frame_stride=2,model={MODELS[0]},score_threshold=0.3"]).sum()).item()
    assert low >= high and low > 0  # a lower threshold keeps at least as many boxes

