"""A stand-in for NVIDIA's PyNvVideoCodec, built on PyAV, for testing `decoder=nvdec` on a machine without a GPU.

It has the calls `job.decode` makes (CreateDemuxer, CreateDecoder, Decode, getPTS, DLPack frames) and decodes
on the CPU, so the handover to PyAV is tested for what it keeps and loses, not for NVDEC's speed. A test puts
this directory on sys.path; `FAIL_AFTER_FRAMES` makes its decoder fail like a GPU that meets a profile it lacks.
"""

from __future__ import annotations

from enum import Enum

import av
import torch

FAIL_AFTER_FRAMES: int | None = None  # raise from Decode once this many frames were handed out
frames_handed_out = 0


class OutputColorType(Enum):
    NATIVE = 0
    RGB = 1
    RGBP = 2


class _Demuxer:
    def __init__(self, filename: str):
        self._container = av.open(filename)
        self.stream = self._container.streams.video[0]

    def GetNvCodecId(self):  # noqa: N802 (NVIDIA's names)
        return self.stream

    def __iter__(self):
        yield from self._container.demux(self.stream)  # ends with the empty packet that flushes the decoder


class _Frame:
    def __init__(self, frame: av.VideoFrame):
        self._pts = frame.pts
        self._rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))

    def getPTS(self) -> int:  # noqa: N802
        return self._pts

    def __dlpack__(self, **kwargs):
        return self._rgb.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._rgb.__dlpack_device__()


class _Decoder:
    def __init__(self, stream):
        self._stream = stream

    def Decode(self, packet) -> list[_Frame]:  # noqa: N802
        global frames_handed_out
        frames = []
        for frame in self._stream.decode(packet):
            if FAIL_AFTER_FRAMES is not None and frames_handed_out >= FAIL_AFTER_FRAMES:
                raise RuntimeError("CUVID decoder: unsupported profile (stand-in)")
            frames_handed_out += 1
            frames.append(_Frame(frame))
        return frames


def CreateDemuxer(filename: str) -> _Demuxer:  # noqa: N802
    return _Demuxer(filename)


def CreateDecoder(gpuid: int, codec, usedevicememory: bool, outputColorType: OutputColorType):  # noqa: N802, N803
    assert outputColorType is OutputColorType.RGB and usedevicememory
    return _Decoder(codec)
