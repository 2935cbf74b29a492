"""detect: batched inference equals torchvision's single-image path; weights loading and its errors."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from conftest import MODEL, THRESHOLD
from torchvision.models import get_model
from torchvision.ops import box_iou

from job.config import ModelConfig, Precision
from job.decode import DecodeProgress, iter_batches, probe
from job.detect import Detector, resolve_device
from job.errors import ConfigError, WeightsError
from job.models import PRESETS, build
from job.samples import calibrated_state_dict, scene, write_video


def reference_model(name: str, weights_path, num_classes: int = 91, **builder_args) -> torch.nn.Module:
    """torchvision's own model, default postprocessing, loaded from the same state_dict."""
    model = get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **builder_args)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    return model.eval()


def cpu_detector(name, weights, threshold, **model) -> Detector:
    return Detector(ModelConfig(name=name, weights=str(weights), **model), threshold, device="cpu")


def assert_same_detections(ours, theirs, threshold, tol=1e-3):
    """Same boxes (IoU >= 0.99), classes and scores (within tol) on both sides.

    A detection scoring within `tol` of the threshold may fall on either side of it after float
    rounding, so it need not be matched; every other one must be.
    """
    keep = (theirs["scores"] >= threshold - tol) & (theirs["labels"] > 0)  # label 0: the background
    boxes, scores, labels = theirs["boxes"][keep], theirs["scores"][keep], theirs["labels"][keep]

    def unmatched(a_boxes, a_scores, a_labels, b_boxes, b_scores, b_labels):
        if len(a_scores) == 0:
            return []
        iou = box_iou(a_boxes, b_boxes) if len(b_scores) else torch.zeros(len(a_scores), 0)
        # Boxes clipped to zero width at the frame edge have no IoU, so also accept near-identical corners.
        close = (a_boxes[:, None, :] - b_boxes[None, :, :]).abs().amax(dim=-1) <= 0.05
        missing = []
        for i in range(len(a_scores)):
            if abs(float(a_scores[i]) - threshold) <= tol:
                continue
            same = (iou[i] >= 0.99) | close[i]
            same &= (b_labels == a_labels[i]) & ((b_scores - a_scores[i]).abs() <= tol)
            if not same.any():
                missing.append(i)
        return missing

    assert not unmatched(ours.boxes, ours.scores, ours.labels, boxes, scores, labels), "extra detections"
    assert not unmatched(boxes, scores, labels, ours.boxes, ours.scores, ours.labels), "missing detections"
    assert (ours.scores >= threshold).all()


@pytest.fixture(scope="module")
def decoded_frames(tmp_path_factory):
    path = write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 12, size=(320, 240))
    info = probe(str(path))
    return torch.cat([b.frames for b in iter_batches(str(path), info, batch_size=6, decoder="decord",
                                                            progress=DecodeProgress())])


def test_batched_detections_equal_torchvision_single_image(weights_path, decoded_frames):
    detector = cpu_detector(MODEL, weights_path, THRESHOLD)
    reference = reference_model(MODEL, weights_path)
    ours = []
    for start in range(0, len(decoded_frames), 6):
        ours.extend(detector(decoded_frames[start : start + 6]))
    total = 0
    with torch.inference_mode():
        for frame, mine in zip(decoded_frames, ours):
            image = frame.permute(2, 0, 1).float() / 255.0
            theirs = reference([image])[0]
            assert_same_detections(mine, theirs, THRESHOLD)
            total += len(mine.scores)
    assert total >= len(decoded_frames), "the calibrated model should find something in most frames"


SSD_FAMILY = {"ssd300_vgg16", "ssdlite320_mobilenet_v3_large"}


@pytest.mark.slow  # twelve models, ResNet-50 ones among them: ~2 min on 2 cores
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_a_fine_tuned_checkpoint_and_matches_torchvision_single_image(tmp_path, name):
    """A 3-class fine-tune (keypoint R-CNN: its 1 class), with builder arguments; batched == single image."""
    num_classes = 2 if name.startswith("keypointrcnn") else 4
    classes = ["forklift", "pallet", "helmet"][: num_classes - 1]
    # Small frames at their own size: the R-CNN family would otherwise upscale them to 800 px.
    builder_args = {} if name in SSD_FAMILY else {"min_size": 96, "max_size": 128}
    if name.startswith(("retinanet", "fcos")):  # their heads start near zero scores (a focal-loss prior)
        builder_args["score_thresh"] = 0.001
    frames = [scene(i, 128, 96) for i in (0, 9)]
    path = tmp_path / f"{name}.pth"
    torch.save(calibrated_state_dict(name, frames, num_classes=num_classes, **builder_args), path)
    reference = reference_model(name, path, num_classes, **builder_args)
    with torch.inference_mode():
        probe_out = reference([torch.from_numpy(frames[0]).permute(2, 0, 1).float() / 255])[0]
    assert len(probe_out["scores"]), "the calibrated model should detect something"
    # A threshold just under the fifth best score, so the comparison covers real detections.
    threshold = float(probe_out["scores"][min(4, len(probe_out["scores"]) - 1)])
    detector = cpu_detector(name, path, threshold, classes=classes, builder_args=builder_args)
    assert detector.class_names == classes
    batch = torch.from_numpy(np.stack(frames))
    ours = detector(batch)
    assert len(ours[0].scores) >= 1
    with torch.inference_mode():
        for frame, mine in zip(batch, ours):
            assert_same_detections(mine, reference([frame.permute(2, 0, 1).float() / 255])[0], threshold)
    assert all(1 <= int(label) < num_classes for out in ours for label in out.labels)


def test_detections_follow_the_pixels(weights_path):
    detector = cpu_detector(MODEL, weights_path, THRESHOLD)
    a, b = scene(0, 320, 240), scene(10, 320, 240)
    out = detector(torch.from_numpy(np.stack([a, a, b])))
    assert torch.equal(out[0].boxes, out[1].boxes)
    assert len(out[0].boxes) and len(out[2].boxes)
    same_shape = out[0].boxes.shape == out[2].boxes.shape
    assert not (same_shape and torch.allclose(out[0].boxes, out[2].boxes, atol=1.0))


def test_boxes_are_clipped_to_the_frame(weights_path):
    detector = cpu_detector(MODEL, weights_path, 0.01)
    out = detector(torch.from_numpy(np.stack([scene(5, 200, 90)])))[0]
    assert len(out.boxes)
    assert out.boxes[:, 0::2].min() >= 0 and out.boxes[:, 0::2].max() <= 200
    assert out.boxes[:, 1::2].min() >= 0 and out.boxes[:, 1::2].max() <= 90


def test_default_weights_without_internet_name_the_local_path_option(monkeypatch, tmp_path):
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match=r"model.weights=/path/to/checkpoint.pth"):
        build(ModelConfig(name=MODEL, weights="DEFAULT"))


def test_weights_errors_are_plain(tmp_path, weights_path):
    with pytest.raises(WeightsError, match="no such file"):
        build(ModelConfig(name=MODEL, weights=str(tmp_path / "missing.pth")))
    with pytest.raises(WeightsError, match="does not fit"):
        build(ModelConfig(name="fcos_resnet50_fpn", weights=str(weights_path)))
    with pytest.raises(ConfigError, match="not a supported detector"):
        build(ModelConfig(name="resnet_does_not_exist"))
    with pytest.raises(WeightsError, match="neither an existing file"):
        build(ModelConfig(name=MODEL, weights="COCO_V7"))


def test_a_91_class_checkpoint_without_names_gets_coco_names(weights_path):
    _, names = build(ModelConfig(name=MODEL, weights=str(weights_path)))
    assert len(names) == 90 and names[0] == "person" and names[2] == "car"  # names[i] is label i + 1


def test_device_auto_picks_cpu_without_cuda_and_cuda_is_refused():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.cuda
def test_cuda_fp32_matches_cpu(weights_path, decoded_frames):
    cpu = cpu_detector(MODEL, weights_path, THRESHOLD)(decoded_frames[:4])
    gpu = Detector(ModelConfig(name=MODEL, weights=str(weights_path)), THRESHOLD, device="cuda")(decoded_frames[:4])
    for a, b in zip(cpu, gpu):
        assert len(a.scores) == len(b.scores)
        if len(a.scores):
            assert box_iou(a.boxes, b.boxes).diagonal().min() >= 0.98


@pytest.mark.parametrize("score_thresh, topk", [(0.001, 5), (0.01, 400), (0.3, 2)])
def test_vectorised_ssd_postprocess_equals_torchvision(score_thresh, topk):
    """Including the per-class top-k cut, which real thresholds rarely reach."""
    from torchvision.models.detection.ssd import SSD

    from job.detect_fast import FastSSD

    torch.manual_seed(0)
    model = get_model(MODEL, weights=None, weights_backbone=None, num_classes=91).eval()
    model.score_thresh, model.topk_candidates = score_thresh, topk
    anchors = [torch.rand(500, 2) * 200 for _ in range(2)]
    anchors = [torch.cat([a, a + 10 + torch.rand(500, 2) * 100], dim=1) for a in anchors]
    head = {"bbox_regression": torch.randn(2, 500, 4) * 0.5, "cls_logits": torch.randn(2, 500, 91) * 3}
    shapes = [(320, 320), (320, 320)]
    theirs = SSD.postprocess_detections(model, head, anchors, shapes)
    ours = FastSSD.postprocess_detections(model, head, anchors, shapes)
    for a, b in zip(ours, theirs):
        assert len(b["scores"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"])


def test_batchnorm_is_folded_away(weights_path):
    detector = cpu_detector(MODEL, weights_path, THRESHOLD)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.model.modules())


@pytest.mark.slow
def test_compiled_model_gives_the_same_detections(weights_path, decoded_frames):
    """model.compile=true (torch.compile of backbone and head) changes speed, not results."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    eager = cpu_detector(MODEL, weights_path, THRESHOLD)
    compiled = cpu_detector(MODEL, weights_path, THRESHOLD, compile=True)
    assert isinstance(compiled.model.backbone, OptimizedModule) and isinstance(compiled.model.head, OptimizedModule)
    frames = decoded_frames[:4]
    graphs = counters["stats"]["unique_graphs"]
    found = 0
    compiled_detections = compiled(frames)
    assert counters["stats"]["unique_graphs"] > graphs, "the compiled modules are what ran"
    for mine, theirs in zip(compiled_detections, eager(frames)):
        assert_same_detections(mine, {"boxes": theirs.boxes, "scores": theirs.scores, "labels": theirs.labels},
                               THRESHOLD)
        found += len(mine.scores)
    assert found > 0


def convolution_dtypes(detector, frames) -> set[torch.dtype]:
    """The dtypes the model's convolutions computed in, for these frames."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in detector.model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        detector(frames)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_precision_setting_is_what_the_convolutions_compute_in(weights_path, decoded_frames, precision, dtype):
    detector = cpu_detector(MODEL, weights_path, THRESHOLD, precision=Precision(precision))
    assert convolution_dtypes(detector, decoded_frames[:1]) == {dtype}


def matched_fraction(reference, other, threshold, margin=0.05, min_iou=0.9):
    """Share of reference detections clear of the threshold that `other` also has (same class, IoU)."""
    matched = total = 0
    for ref, oth in zip(reference, other):
        clear = ref.scores >= threshold + margin
        for box, label in zip(ref.boxes[clear], ref.labels[clear]):
            total += 1
            same = oth.labels == label
            matched += bool(same.any() and box_iou(box[None], oth.boxes[same]).max() >= min_iou)
    return matched / total, total


def test_fp16_keeps_the_promised_share_of_fp32_detections(weights_path, decoded_frames):
    """The tolerance benchmarks/gpu.md promises for model.precision=fp16, checked with CPU autocast."""
    fp32 = cpu_detector(MODEL, weights_path, THRESHOLD)(decoded_frames)
    half = cpu_detector(MODEL, weights_path, THRESHOLD, precision=Precision.fp16)
    assert convolution_dtypes(half, decoded_frames[:1]) == {torch.float16}, "autocast reached the model"
    fp16 = half(decoded_frames)
    share, total = matched_fraction(fp32, fp16, THRESHOLD)
    assert total >= 20
    assert share >= 0.9, share


def test_a_batchs_detections_are_those_of_its_frames_thresholded_one_by_one():
    """`_to_cpu` thresholds, scales and clips the whole batch at once (three copies off the device, not three
    a frame): the same bits as frame by frame, in fp16 and bf16 too (compared in the scores' precision)."""
    from job.detect import _to_cpu

    def frame_by_frame(outputs, threshold, width, height, scale):
        for out in outputs:
            keep = (out["scores"] >= threshold) & (out["labels"] > 0)
            boxes = out["boxes"][keep].float()
            boxes = boxes * scale if scale is not None else boxes
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            yield boxes, out["scores"][keep].float(), out["labels"][keep]

    generator = torch.Generator().manual_seed(0)
    for dtype, scale in [(torch.float32, None), (torch.float16, torch.tensor([1.3, 0.7, 1.3, 0.7])),
                         (torch.bfloat16, None)]:
        outputs = [{"boxes": (torch.rand(n, 4, generator=generator) * 400 - 50).to(dtype),
                    "scores": torch.rand(n, generator=generator).to(dtype),
                    "labels": torch.randint(0, 5, (n,), generator=generator)} for n in (7, 0, 30, 1)]
        batched = _to_cpu(outputs, 0.3, 320, 240, scale)
        expected = list(frame_by_frame(outputs, 0.3, 320, 240, scale))
        assert len(batched) == 4 and sum(len(d.scores) for d in batched) > 0
        for got, (boxes, scores, labels) in zip(batched, expected, strict=True):
            assert torch.equal(got.boxes, boxes) and torch.equal(got.scores, scores) and torch.equal(got.labels, labels)


@pytest.mark.parametrize("at_once", [True, False])
@pytest.mark.parametrize(("height", "width", "min_size", "max_size"),
                         [(96, 128, 800, 1333), (240, 320, 200, 300), (180, 100, 160, 240), (72, 90, 64, 1000)])
def test_the_batched_transform_equals_torchvisions_per_image_transform(height, width, min_size, max_size, at_once):
    """Upscaled, downscaled, portrait, bound by max_size; padded to 32: the same ImageList as torchvision's."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from job.detect_fast import prepare_rcnn_batch

    transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    frames = torch.from_numpy(np.stack([scene(i, width, height) for i in (0, 5, 11)]))
    theirs, _ = transform([frame.permute(2, 0, 1).float() / 255 for frame in frames])
    ours = prepare_rcnn_batch(transform, frames, at_once=at_once)
    assert ours.image_sizes == theirs.image_sizes
    assert ours.tensors.shape == theirs.tensors.shape
    torch.testing.assert_close(ours.tensors, theirs.tensors, rtol=0, atol=1e-5)
    assert ours.tensors.shape[-2] % 32 == 0 and ours.tensors.shape[-1] % 32 == 0


def test_a_batched_transform_preset_gives_torchvisions_detections_on_resized_frames(tmp_path):
    """Faster R-CNN at its own sizes (frames upscaled to 800 px by its transform): the Detector, which
    prepares the batch itself, against torchvision's model frame by frame."""
    from job.detect_fast import BatchPreparedTransform

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    frames = [scene(i, 160, 120) for i in (0, 9, 3)]
    path = tmp_path / "model.pth"
    torch.save(calibrated_state_dict(name, frames, num_classes=4), path)
    reference = reference_model(name, path, 4)
    with torch.inference_mode():
        probe_out = reference([torch.from_numpy(frames[0]).permute(2, 0, 1).float() / 255])[0]
    assert len(probe_out["scores"]), "the calibrated model should detect something"
    threshold = float(probe_out["scores"][min(4, len(probe_out["scores"]) - 1)])
    detector = cpu_detector(name, path, threshold, classes=["a", "b", "c"])
    assert isinstance(detector.model.transform, BatchPreparedTransform)  # the batched path is the one tested
    batch = torch.from_numpy(np.stack(frames))
    ours = detector(batch)
    assert sum(len(out.scores) for out in ours) >= 1
    with torch.inference_mode():
        for frame, mine in zip(batch, ours):
            assert_same_detections(mine, reference([frame.permute(2, 0, 1).float() / 255])[0], threshold)



def test_frames_converted_from_planes_on_the_device_keep_the_detections_that_follow_the_pixels(tmp_path):
    """`colour_on_device` with a detector whose answers are known (the box around the pixels over a level):
    the device's YUV -> RGB (within 2 levels of swscale's, tests/test_colour.py) finds the same boxes to a
    pixel. The seeded test weights cannot judge this: a level of noise changes most of their detections."""
    frames = [scene(i, 320, 240) for i in range(12)]
    for i, frame in enumerate(frames):  # a bright square that moves, on the scene's own boxes
        frame[40 + 5 * i: 100 + 5 * i, 30 + 11 * i: 110 + 11 * i] = (235, 225, 240)
    path = write_video(tmp_path / "clip.mp4", frames)
    info = probe(str(path))
    detector = Detector(ModelConfig(_target_="plugins.build", weights="none"), 0.5, device="cpu")
    rgb = torch.cat([b.frames for b in iter_batches(str(path), info, batch_size=6)])
    planar = list(iter_batches(str(path), info, batch_size=6, planar=True))
    assert all(b.planar is not None and b.frames.shape[1:] == (360, 320) for b in planar)
    ours = [frame for b in planar for frame in detector.detect_batch(b.frames, b.planar).frames()]
    theirs = detector(rgb)
    assert [len(f.boxes) for f in ours] == [len(f.boxes) for f in theirs] == [1] * 12
    assert torch.equal(torch.cat([f.boxes for f in ours]), torch.cat([f.boxes for f in theirs]))
    assert len({tuple(f.boxes[0].tolist()) for f in ours}) == 12  # the boxes follow the square
