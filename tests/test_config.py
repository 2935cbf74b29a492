"""config: composition, typed validation at start-up."""

from __future__ import annotations

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from job.config import Device, for_device
from job.errors import ConfigError
from job.models import PRESETS

REQUIRED = ["video_dir=/v", "output_dir=/o"]


def test_defaults_compose_to_the_documented_values():
    cfg = compose_config(REQUIRED)
    assert cfg.model.name == "ssdlite320_mobilenet_v3_large"
    assert cfg.model.weights == "DEFAULT"
    assert cfg.model.compile is False
    assert cfg.device == Device.auto
    assert cfg.ray.address is None
    assert (cfg.batch_size, cfg.frame_stride, cfg.score_threshold) == (None, 1, 0.5)
    assert cfg.prefetch_batches is None
    assert cfg.output.commit_every_frames == 512


@pytest.mark.parametrize("model", PRESETS)
def test_every_preset_composes_to_its_builder(model):
    assert compose_config([*REQUIRED, f"model={model}"]).model.name == model


def test_own_detector_settings_compose():
    cfg = compose_config([*REQUIRED, "model.classes=[forklift,pallet]", "+model.builder_args.min_size=640",
                          "model.num_classes=3", "model._target_=my_pkg.detectors.build"])
    assert cfg.model.classes == ["forklift", "pallet"] and cfg.model.builder_args == {"min_size": 640}
    assert (cfg.model.num_classes, cfg.model._target_) == (3, "my_pkg.detectors.build")
    assert compose_config([*REQUIRED, "model.classes=/data/classes.txt"]).model.classes == "/data/classes.txt"


def test_presets_are_exactly_the_supported_builders():
    from pathlib import Path

    from conftest import CONFIG_DIR

    assert sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize(
    "override, error",
    [
        ("batch_sise=4", (ConfigCompositionException, ConfigKeyError)),
        ("batch_size=four", (ConfigCompositionException, ValidationError)),
        ("device=gpu", (ConfigCompositionException, ValidationError)),
        ("model.precision=fp8", (ConfigCompositionException, ValidationError)),
        ("ray.adress=auto", (ConfigCompositionException, ConfigKeyError)),
    ],
)
def test_wrong_keys_and_types_fail_at_composition(override, error):
    with pytest.raises(error):
        compose_config([*REQUIRED, override])


def test_missing_video_dir_is_a_one_line_error_naming_both_required_keys():
    with pytest.raises(ConfigError, match="video_dir is required: python -m job video_dir="):
        compose_config(["output_dir=/o"])


@pytest.mark.parametrize("override", ["+score_treshold=0.3", "+model.class_names=[a,b]", "+ray.adress=auto"])
def test_keys_added_with_plus_that_the_schema_lacks_are_refused(override):
    """Hydra's own hint for a typo is `+key=value`, which would add a key the job silently ignores."""
    with pytest.raises(ConfigError, match=f"unknown setting {override[1:].split('=')[0]}"):
        compose_config([*REQUIRED, override])


def test_paths_are_expanded_and_made_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["video_dir='~/videos'", "output_dir=out"])  # Hydra wants ~ quoted
    assert (cfg.video_dir, cfg.output_dir) == (str(tmp_path / "videos"), str(tmp_path / "out"))
    assert compose_config(["video_dir=s3://b/v", "output_dir=gs://b/o"]).output_dir == "gs://b/o"


@pytest.mark.parametrize("override", ["frame_stride=0", "batch_size=0", "score_threshold=1.5", "ray.num_actors=0"])
def test_impossible_values_are_rejected_when_loaded(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose_config([*REQUIRED, override])


def test_null_batch_size_and_prefetch_are_resolved_once_for_the_device():
    cfg = compose_config([*REQUIRED, "batch_size=null", "prefetch_batches=null"])
    cpu, gpu = for_device(cfg, "cpu"), for_device(cfg, "cuda")
    assert (cpu.batch_size, cpu.prefetch_batches) == (4, 0)
    assert (gpu.batch_size, gpu.prefetch_batches) == (16, 2)
    assert (cpu.colour_on_device, gpu.colour_on_device) == (False, True)  # swscale on a CPU, the device on a GPU
    explicit = for_device(compose_config([*REQUIRED, "batch_size=7", "prefetch_batches=3", "colour_on_device=false"]),
                          "cuda")
    assert (explicit.batch_size, explicit.prefetch_batches, explicit.colour_on_device) == (7, 3, False)
    assert cfg.batch_size is None, "resolving returns a copy"
