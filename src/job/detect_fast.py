"""Exact fast paths for torchvision's detectors: the same detections with less work per frame.

torchvision's SSD postprocessing loops over 90 classes per image in Python, and its transform
normalises full-size float images before resizing them. For a fixed-size model, postprocessing
can be vectorised, and each frame resized first and normalised at the model's size, written
straight into the batch. The other presets (Faster R-CNN, RetinaNet, FCOS) get their transform's
steps run over the whole batch at once (`prepare_rcnn_batch`): on a GPU one kernel a step instead
of one a frame. `tests/test_detect.py` checks the results against torchvision's own path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops


class PreparedTransform(GeneralizedRCNNTransform):
    """SSD's transform for a batch that `prepare_batch` already resized to the model's size and normalised.

    Batching and the image sizes that postprocessing rescales by stay torchvision's own.
    """

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image, target=None):
        return image, target


class FastSSD(SSD):
    """torchvision's SSD with its postprocessing vectorised; adds no state, only overrides a method."""

    def postprocess_detections(self, head_outputs, image_anchors, image_shapes):
        """torchvision's SSD.postprocess_detections without the per-class Python loop.

        Same candidates (score > score_thresh, at most topk_candidates per class, in class order and
        by descending score within a class), same box decoding, clipping, batched NMS and cap.
        """
        pred_scores = F.softmax(head_outputs["cls_logits"], dim=-1)
        num_classes = pred_scores.size(-1)
        detections = []
        for regression, scores, anchors, image_shape in zip(head_outputs["bbox_regression"], pred_scores,
                                                            image_anchors, image_shapes):
            anchor_index, class_index = (scores[:, 1:] > self.score_thresh).nonzero(as_tuple=True)
            labels = class_index + 1
            score = scores[anchor_index, labels]
            order = torch.argsort(score, descending=True, stable=True)
            order = order[torch.argsort(labels[order], stable=True)]
            anchor_index, labels, score = anchor_index[order], labels[order], score[order]
            counts = torch.bincount(labels, minlength=num_classes)
            if len(counts) and int(counts.max()) > self.topk_candidates:
                first_of_class = torch.cumsum(counts, 0) - counts
                rank = torch.arange(len(labels), device=labels.device) - first_of_class[labels]
                keep = rank < self.topk_candidates
                anchor_index, labels, score = anchor_index[keep], labels[keep], score[keep]
            boxes = self.box_coder.decode_single(regression[anchor_index], anchors[anchor_index])
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            keep = box_ops.batched_nms(boxes, score, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": score[keep], "labels": labels[keep]})
        return detections


def enable_fast_ssd(model: SSD) -> FastSSD:
    """Turn a built (and loaded) SSD into a FastSSD fed by `prepare_batch`.

    The builders construct `SSD` directly, so the subclass is applied to the built model; FastSSD
    adds no attributes, so its instances are exactly torchvision's with one method overridden.
    """
    model.__class__ = FastSSD
    old = model.transform
    model.transform = PreparedTransform(
        old.min_size, old.max_size, old.image_mean, old.image_std, size_divisible=old.size_divisible,
        fixed_size=old.fixed_size, _skip_resize=getattr(old, "_skip_resize", False),
    )
    return model


def prepare_batch(model: SSD, frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, h, w) at the model's fixed size, scaled to [0, 1], normalised.

    Resizing first is exact up to float rounding: bilinear weights sum to one, so resizing
    commutes with the per-channel affine normalisation torchvision applies before it. Frames
    become float one at a time (as torchvision resizes them): a whole 720p batch as float is
    ~88 MB, over glibc's largest mmap threshold (32 MB), so it was mapped and page-faulted in
    afresh on every call (benchmarks/micro.md).
    """
    transform = model.transform
    width, height = transform.fixed_size
    batch = torch.empty((len(frames), 3, height, width), dtype=torch.float32, device=frames.device,
                        memory_format=torch.channels_last)
    for image, frame in zip(batch, frames):
        full = frame.permute(2, 0, 1).unsqueeze(0).float()
        image.copy_(F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)[0])
    mean = torch.as_tensor(transform.image_mean, dtype=batch.dtype, device=batch.device)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=batch.dtype, device=batch.device)[:, None, None]
    return batch.div_(255.0).sub_(mean).div_(std)


class BatchPreparedTransform(GeneralizedRCNNTransform):
    """A model's transform that hands on the batch `prepare_rcnn_batch` made for this call (`prepared`),
    so the model's forward, heads and postprocessing stay torchvision's own: it still reads each frame's
    original size from the images it is given, and scales boxes back to it as it always does."""

    prepared: ImageList | None = None

    def forward(self, images, targets=None):
        prepared, self.prepared = self.prepared, None
        if prepared is None:  # not called through the Detector: torchvision's own steps
            return super().forward(images, targets)
        return prepared, targets


def batches_the_transform(model: torch.nn.Module) -> bool:
    """Whether the model's input goes through torchvision's own transform at a size it computes per image
    (the R-CNN family, RetinaNet, FCOS): `enable_batched_transform` then applies."""
    transform = getattr(model, "transform", None)
    return type(transform) is GeneralizedRCNNTransform and transform.fixed_size is None


def enable_batched_transform(model: torch.nn.Module) -> None:
    """Turn a built model's transform into a `BatchPreparedTransform` (no new state: only a method)."""
    model.transform.__class__ = BatchPreparedTransform


def prepare_rcnn_batch(transform: GeneralizedRCNNTransform, frames: torch.Tensor,
                       at_once: bool | None = None) -> ImageList:
    """uint8 (B, H, W, 3) -> torchvision's transform of them, as one ImageList: scaled to [0, 1],
    normalised, resized by the factor torchvision computes, padded to its `size_divisible`.

    The same operations in the same order as torchvision's per-image path, so the same values up to
    the kernels' rounding. `at_once` (default: on a GPU) does each step over the whole batch; otherwise
    a frame at a time into the padded batch, which on a CPU stays under glibc's mmap threshold
    (see prepare_batch).
    """
    height, width = frames.shape[1:3]
    size = transform.min_size[-1]
    scale = min(size / min(height, width), transform.max_size / max(height, width))
    mean = torch.as_tensor(transform.image_mean, dtype=torch.float32, device=frames.device)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=torch.float32, device=frames.device)[:, None, None]
    step = len(frames) if (frames.device.type == "cuda" if at_once is None else at_once) else 1
    images, batch = frames.permute(0, 3, 1, 2), None
    for start in range(0, len(frames), step):
        chunk = (images[start:start + step].float().div_(255.0) - mean) / std
        chunk = F.interpolate(chunk, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)
        resized_h, resized_w = chunk.shape[-2:]
        if batch is None:
            stride = transform.size_divisible
            batch = chunk.new_zeros((len(frames), 3, math.ceil(resized_h / stride) * stride,
                                     math.ceil(resized_w / stride) * stride))
        batch[start:start + step, :, :resized_h, :resized_w].copy_(chunk)
    return ImageList(batch, [(int(resized_h), int(resized_w))] * len(frames))
