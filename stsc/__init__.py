"""stsc: stage-aware sparse training (STS) for multimodal LLMs, as graph transformations.

Pipeline: :mod:`stsc.capture` (model -> graphs) -> :mod:`stsc.match` (graphs -> blocks, boundary)
-> passes -> runtime (:mod:`stsc.sparse`). :func:`inspect` runs the first two stages and returns a :class:`Report`;
:func:`sparsify` applies a stage policy (:mod:`stsc.policy`) and returns a :class:`SparseModel`;
:func:`profile` measures token and layer redundancy and proposes a policy (:mod:`stsc.proposal`).
"""

from .capture import Capture, CaptureError, capture
from .loader import ModelFileError, load_model_file
from .match import Block, Boundary, Structure, match
from .policy import Policy, PolicyError, load_policy
from .profile import Profile, profile
from .report import Report, inspect
from .sparse import SparseModel, UnsupportedModelError, sparsify

__all__ = ["Block", "Boundary", "Capture", "CaptureError", "ModelFileError", "Policy", "PolicyError", "Profile",
           "Report", "SparseModel", "Structure", "UnsupportedModelError", "capture", "inspect", "load_model_file",
           "load_policy", "match", "profile", "sparsify"]
__version__ = "0.1.0"
