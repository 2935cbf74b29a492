"""Batch object detection over a directory of videos, written as partitioned Parquet.

The pipeline, one module per stage: discover -> decode -> detect -> write, driven per video by
`process` and across a Ray actor pool by `run`.
"""

__version__ = "0.1.0"
