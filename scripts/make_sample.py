"""Make the demo input: a few tiny videos (one of them broken on purpose) and offline weights.

    python scripts/make_sample.py demo
    python -m job video_dir=demo/videos output_dir=demo/out model.weights=demo/ssdlite320_mobilenet_v3_large-calibrated.pth

The weights are a seeded model calibrated on the demo frames (no internet needed); on a machine
with internet, leave model.weights out to use torchvision's pretrained COCO weights.
"""

import sys

from job.samples import make_demo

if __name__ == "__main__":
    videos, weights = make_demo(sys.argv[1] if len(sys.argv) > 1 else "demo")
    print(f"videos:  {videos}\nweights: {weights}")
