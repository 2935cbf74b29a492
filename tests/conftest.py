"""Shared fixtures: a small real Ray, offline detector weights, composed configs, generated videos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from job.config import JobConfig, load, register_configs
from job.samples import calibrated_state_dict, scene

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
MODEL = "ssdlite320_mobilenet_v3_large"
# Calibrated seeded weights score 0.2-0.4: a threshold that keeps a few boxes per frame.
THRESHOLD = 0.25

register_configs()
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def compose_config(overrides: list[str]) -> JobConfig:
    """The typed settings `python -m job` would run with these overrides (checked as the CLI does)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    return load(cfg)


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / f"{MODEL}-calibrated.pth"
    torch.save(calibrated_state_dict(MODEL, [scene(i, 320, 240) for i in range(0, 48, 3)]), path)
    return path


@pytest.fixture
def make_cfg(tmp_path, weights_path):
    """Config for a test: outputs under tmp_path, CPU, offline weights, two 1-CPU actors."""

    def make(video_dir: Path, *overrides: str, output_dir: Path | None = None) -> JobConfig:
        return compose_config(
            [
                f"video_dir={video_dir}",
                f"output_dir={output_dir or tmp_path / 'out'}",
                f"model.weights={weights_path}",
                f"score_threshold={THRESHOLD}",
                "device=cpu",
                "batch_size=4",
                "ray.num_actors=2",
                "ray.cpus_per_actor=1",
                *overrides,
            ]
        )

    return make


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()
