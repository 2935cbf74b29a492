"""A plug-in detector as a team would write one: not a torchvision builder, same detection API."""

from __future__ import annotations

import torch


class BrightSquareDetector(torch.nn.Module):
    """Finds the box around the pixels brighter than `level` in every channel: one object per frame."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:  # (3, H, W) float in [0, 1]
            ys, xs = torch.nonzero((image > self.level).all(dim=0), as_tuple=True)
            if len(xs) == 0:
                outputs.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
                                "labels": torch.zeros(0, dtype=torch.int64)})
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            outputs.append({"boxes": box, "scores": torch.tensor([0.99]), "labels": torch.tensor([1])})
        return outputs


def build(weights: str, level: float = 0.8):
    """The plug-in contract: (module, class names for labels 1..N)."""
    return BrightSquareDetector(level), ["__background__", "bright square"]


class NothingDetector(torch.nn.Module):
    """Finds nothing and costs nothing (uint8 frames, no conversion): what is left is the job's own cost."""

    takes_uint8 = True

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        return [empty for _ in images]


def build_nothing(weights: str):
    return NothingDetector(), ["__background__", "nothing"]


HOSTILE_CLASS = "<script>alert('class')</script> & \"q\" ../../../escaped"


def build_hostile(weights: str, level: float = 0.8):
    """The bright-square detector under a class name that is markup, quotes and a path."""
    return BrightSquareDetector(level), [HOSTILE_CLASS]
