"""stsc: stage-aware sparse training (STS) for multimodal LLMs, as graph transformations.

Pipeline: :mod:`stsc.capture` (model -> graphs) -> :mod:`stsc.match` (graphs -> blocks, boundary)
-> passes -> runtime. :func:`inspect` runs the first two stages and returns a :class:`Report`.
"""

from .capture import Capture, CaptureError, capture
from .loader import ModelFileError, load_model_file
from .match import Block, Boundary, Structure, match
from .report import Report, inspect

__all__ = ["Block", "Boundary", "Capture", "CaptureError", "ModelFileError", "Report", "Structure", "capture",
           "inspect", "load_model_file", "match"]
__version__ = "0.1.0"
