"""models: own detectors — checkpoints with their own classes, class names, plug-ins, start-up errors."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from cli import run_cli

from job.config import ModelConfig
from job.detect import Detector
from job.errors import ConfigError, WeightsError
from job.models import label_names, read_checkpoint, resolve
from job.samples import calibrated_state_dict, scene, write_video

TESTS = Path(__file__).parent
SSDLITE = "ssdlite320_mobilenet_v3_large"
FRCNN = "fasterrcnn_mobilenet_v3_large_fpn"
FRCNN_ARGS = {"min_size": 240, "max_size": 320}  # what the fine-tune was trained with


def frames():
    return [scene(i, 320, 240) for i in range(0, 48, 3)]


@pytest.fixture(scope="module")
def three_class_ssdlite(tmp_path_factory) -> Path:
    """A fine-tuned ssdlite with 3 classes (+ background) saved as a plain state_dict."""
    path = tmp_path_factory.mktemp("w") / "ssdlite-3.pth"
    torch.save(calibrated_state_dict(SSDLITE, frames(), num_classes=4), path)
    return path


@pytest.fixture(scope="module")
def two_class_frcnn_reference_checkpoint(tmp_path_factory) -> Path:
    """A 2-class Faster R-CNN as torchvision's detection reference script saves it (train.py).

    Fine-tunes start from a pretrained backbone, whose FrozenBatchNorm2d has no num_batches_tracked.
    """
    state = calibrated_state_dict(FRCNN, frames(), num_classes=3, **FRCNN_ARGS)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    args = argparse.Namespace(model=FRCNN, epochs=26, lr=0.02, data_path="/data/forklifts", weights_backbone="DEFAULT")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.02, momentum=0.9)
    checkpoint = {"model": state, "optimizer": optimizer.state_dict(),
                  "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 8).state_dict(), "args": args, "epoch": 25}
    path = tmp_path_factory.mktemp("w") / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path


def assert_follows_the_pixels(detector: Detector) -> None:
    a, b = scene(0, 320, 240), scene(10, 320, 240)
    out = detector(torch.from_numpy(np.stack([a, a, b])))
    assert len(out[0].boxes) and len(out[2].boxes), "the calibrated model should find something"
    assert torch.equal(out[0].boxes, out[1].boxes)
    same_shape = out[0].boxes.shape == out[2].boxes.shape
    assert not (same_shape and torch.allclose(out[0].boxes, out[2].boxes, atol=1.0))


def test_class_lists_of_n_or_background_plus_n_are_accepted_and_others_name_both_counts():
    assert label_names(["a", "b", "c"], 4, "model.classes") == ["a", "b", "c"]
    assert label_names(["__background__", "a", "b", "c"], 4, "model.classes") == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="model.classes has 2 class names but the model's head has 3 classes"):
        label_names(["a", "b"], 4, "model.classes")
    with pytest.raises(ConfigError, match="must start with the background"):
        label_names(["a", "b", "c", "d"], 4, "model.classes")


def test_a_three_class_state_dict_with_inline_names(three_class_ssdlite):
    model = resolve(ModelConfig(name=SSDLITE, weights=str(three_class_ssdlite), classes=["forklift", "pallet", "person"]))
    assert (model.num_classes, model.classes) == (4, ["forklift", "pallet", "person"])
    detector = Detector(model, 0.3, device="cpu")
    assert detector.class_names == ["forklift", "pallet", "person"]
    assert_follows_the_pixels(detector)
    labels = torch.cat([d.labels for d in detector(torch.from_numpy(np.stack(frames()[:4])))])
    assert len(labels) and set(labels.tolist()) <= {1, 2, 3}


def test_a_reference_script_checkpoint_with_names_from_a_file(two_class_frcnn_reference_checkpoint, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("forklift\npallet\n")
    model = resolve(ModelConfig(name=FRCNN, weights=str(two_class_frcnn_reference_checkpoint), classes=str(names),
                                builder_args=FRCNN_ARGS))
    assert (model.num_classes, model.classes) == (3, ["forklift", "pallet"])
    detector = Detector(model, 0.1, device="cpu")
    assert_follows_the_pixels(detector)


def test_a_checkpoint_that_carries_its_names_needs_no_classes_setting(three_class_ssdlite, tmp_path):
    path = tmp_path / "named.pth"
    torch.save({"model": torch.load(three_class_ssdlite, weights_only=True),
                "classes": ["__background__", "helmet", "vest", "boot"]}, path)
    assert read_checkpoint(str(path)).classes == ["__background__", "helmet", "vest", "boot"]
    assert resolve(ModelConfig(name=SSDLITE, weights=str(path))).classes == ["helmet", "vest", "boot"]
    # Given names win over the checkpoint's.
    assert resolve(ModelConfig(name=SSDLITE, weights=str(path), classes=["a", "b", "c"])).classes == ["a", "b", "c"]


def test_without_names_a_non_coco_head_gets_numbered_names_and_a_warning(three_class_ssdlite, caplog):
    assert resolve(ModelConfig(name=SSDLITE, weights=str(three_class_ssdlite))).classes == [
        "class_1", "class_2", "class_3"]
    assert "pass model.classes" in caplog.text


def test_num_classes_override_is_checked_against_the_head(three_class_ssdlite):
    with pytest.raises(WeightsError, match="does not fit model=ssdlite320_mobilenet_v3_large with num_classes=6"):
        resolve(ModelConfig(name=SSDLITE, weights=str(three_class_ssdlite), num_classes=6))


class NotAllowed:
    """Pickled as a custom class: a checkpoint that would run code when unpickled without weights_only."""


def test_checkpoints_are_never_unpickled_unsafely(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": NotAllowed()}, path)
    with pytest.raises(WeightsError, match="holds a test_models.NotAllowed object, which loading it safely"):
        read_checkpoint(str(path))


def run_job(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(f"hydra.run.dir={tmp_path / 'hydra'}", "score_threshold=0.3", "device=cpu", "ray.num_cpus=2",
                   *args, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_video(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("videos")
    write_video(directory / "yard.mp4", 12, size=(320, 240))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong class count", "another architecture", "not a checkpoint"])
def test_what_does_not_fit_stops_at_start_up_with_one_line_and_writes_nothing(case, tmp_path, one_video,
                                                                             three_class_ssdlite):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("these are notes, not weights")
    args = {
        "wrong class count": [f"model.weights={three_class_ssdlite}", "model.classes=[forklift,pallet]"],
        "another architecture": [f"model.weights={three_class_ssdlite}", "model=fcos_resnet50_fpn"],
        "not a checkpoint": [f"model.weights={not_a_checkpoint}"],
    }[case]
    expected = {
        "wrong class count": "model.classes has 2 class names but the model's head has 3 classes",
        "another architecture": "does not fit model=fcos_resnet50_fpn",
        "not a checkpoint": "is not a PyTorch checkpoint",
    }[case]
    out = tmp_path / "out"
    result = run_job(tmp_path, f"video_dir={one_video}", f"output_dir={out}", *args)
    assert result.returncode == 2, result.output[-3000:]
    assert expected in result.output and "Traceback" not in result.output
    assert not (out / "predictions").exists()
    assert not (out / "_state" / "settings.json").exists(), "a failed start must not lock output_dir's settings"


@pytest.mark.slow
def test_a_run_with_own_classes_writes_their_names(ray_session, make_cfg, three_class_ssdlite, one_video, tmp_path):
    from job.run import run

    names = ["forklift", "pallet", "person"]
    cfg = make_cfg(one_video, f"model.weights={three_class_ssdlite}", f"model.classes=[{','.join(names)}]",
                   "score_threshold=0.3")
    summary = run(cfg)
    assert summary.ok == 1 and summary.detections > 0
    preds = pl.scan_parquet(f"{cfg.output_dir}/predictions/**/*.parquet", hive_partitioning=True).collect()
    assert preds.height == summary.detections
    for class_id, class_name in preds.select("class_id", "class_name").unique().iter_rows():
        assert class_name == names[class_id - 1]
    # Other names into the same output_dir would mix two vocabularies: refused.
    from job.errors import SettingsMismatchError

    with pytest.raises(SettingsMismatchError, match="classes"):
        run(make_cfg(one_video, f"model.weights={three_class_ssdlite}", "model.classes=[a,b,c]",
                     "score_threshold=0.3"))


@pytest.mark.slow
def test_a_plug_in_detector_runs_through_the_job(tmp_path):
    """Its boxes follow a white square across the frames, under the plug-in's own class name."""
    size, side, step = (160, 120), 20, 6
    square_frames = []
    for i in range(10):
        image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        image[40:40 + side, 10 + i * step:10 + i * step + side] = 255
        square_frames.append(image)
    write_video(tmp_path / "in" / "square.mp4", square_frames, size=size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    result = run_job(tmp_path, f"video_dir={tmp_path / 'in'}", f"output_dir={out}", "model._target_=plugins.build",
                     "+model.builder_args.level=0.8", "ray.num_actors=1", env=env)
    assert result.returncode == 0, result.output[-3000:]
    preds = pl.read_parquet(out / "predictions").sort("frame_index")
    assert preds["frame_index"].to_list() == list(range(10))
    assert set(preds["class_name"]) == {"bright square"}
    for row in preds.iter_rows(named=True):
        left = 10 + row["frame_index"] * step
        assert abs(row["x1"] - left) <= 2 and abs(row["x2"] - (left + side)) <= 2, row
        assert abs(row["y1"] - 40) <= 2 and abs(row["y2"] - (40 + side)) <= 2, row
