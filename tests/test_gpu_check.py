"""scripts/gpu_check.py, the one-command GPU check, runs on the job's code paths: here with --device cpu --quick."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_here_on_cpu(tmp_path):
    report = tmp_path / "gpu.md"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                             "--out", str(report)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    assert text.startswith("## GPU check: ") and "--quick: sizes too small to mean anything" in text
    for precision in ("fp32", "fp16", "bf16"):
        assert re.search(rf"\| ssdlite320_mobilenet_v3_large \| {precision} \| 2 \| \d+\.\d \|", text), precision
    assert re.search(r"\| 2 \| 1 \| \d+\.\d \| \d+\.\d \|", text)  # two decode streams at once, to RGB and to planes
    for pyav in ("planes converted on the device", "RGB from the decoder"):  # all 16 frames committed
        assert re.search(rf"\| ssdlite320_mobilenet_v3_large \| pyav, {pyav} \| 16 \| \d+\.\d \| \d+% \|", text), pyav
    assert "Decoding only (NVDEC, frames left on the GPU):\n\n(skipped: " in text  # no GPU here
    for decoding_in in ("child processes", "threads"):  # two streams into one model, all 32 frames committed
        assert re.search(rf"\| ssdlite320_mobilenet_v3_large \| 2 \| {decoding_in} \| 32 \| \d+\.\d \|", text), decoding_in
