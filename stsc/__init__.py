"""stsc: stage-aware sparse training (STS) for multimodal LLMs, as graph transformations.

Pipeline: :mod:`stsc.capture` (model -> graphs) -> :mod:`stsc.match` (graphs -> blocks, boundary)
-> passes (``stsc.passes``: what to rewrite) -> lowering (how: module hooks in each pass, or graph edits in
:mod:`stsc.lowering.graph`) -> runtime (:mod:`stsc.sparse`). :func:`inspect` runs the first two stages and
returns a :class:`Report`; :func:`sparsify` applies a stage policy (:mod:`stsc.policy`) with the module lowering
and returns a :class:`SparseModel`; :func:`transform` lowers each stage to a rewritten, exported graph
(:class:`GraphStage`), and :func:`backend` rewrites the graphs ``torch.compile`` hands it; :func:`profile` measures token and layer redundancy and proposes a policy.
"""

from .capture import Capture, CaptureError, capture
from .loader import ModelFileError, load_model_file
from .lowering.backend import CompileBackend, backend
from .lowering.graph import GraphLoweringUnavailable, GraphStage, transform
from .match import Block, Boundary, Structure, match
from .policy import Policy, PolicyError, load_policy
from .profile import Profile, profile
from .report import Report, inspect
from .sparse import SparseModel, UnsupportedModelError, sparsify

__all__ = ["Block", "Boundary", "Capture", "CaptureError", "CompileBackend", "GraphLoweringUnavailable", "GraphStage", "ModelFileError",
           "Policy", "PolicyError", "Profile", "Report", "SparseModel", "Structure", "UnsupportedModelError", "capture",
           "inspect", "load_model_file", "load_policy", "match", "profile", "sparsify", "transform", "backend"]
__version__ = "0.1.0"
