"""``DistributedDataParallel`` without ``find_unused_parameters`` while ``skip_layers`` skips blocks.

    ddp = torch.nn.parallel.DistributedDataParallel(sparse)      # find_unused_parameters=False (the default)
    stsc.integrations.ddp.attach(ddp, sparse)

DDP's reducer all-reduces a bucket once every parameter in it has reported its gradient, so a
parameter that takes no part in the backward stalls it; ``find_unused_parameters=True`` finds such
parameters by walking the autograd graph from the outputs after every forward. Here every rank
knows before the forward which blocks it skips (the decisions are rank-identical by construction),
so no walk is needed: after each training forward, the outputs are passed through an identity
whose backward hands the skipped blocks' parameters no gradient (``None``). Their reducer hooks
fire with it: DDP counts them, reduces zeros in their place, and writes those zeros into ``.grad``.
When the backward is over (after DDP has copied its buckets back), every parameter of a block
skipped in this forward whose ``.grad`` was ``None`` before it gets ``None`` back. So, as in plain
PyTorch and with ``find_unused_parameters=True``, a block skipped in every micro-batch of an
optimizer step keeps ``.grad = None`` (AdamW leaves it alone), and a block skipped in one micro-batch
and run in another (``ddp.no_sync()`` for the first) gets the gradient of the micro-batch where it ran.
Communication is DDP's either way: whole buckets, zeros in the skipped parameters' places.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.autograd import Variable

from stsc.sparse import SparseModel

__all__ = ["attach"]


def attach(ddp: torch.nn.parallel.DistributedDataParallel, sparse: SparseModel) -> None:
    """Let ``ddp`` (wrapping ``sparse``, without ``find_unused_parameters``) train while blocks are skipped."""
    if ddp.module is not sparse:
        raise ValueError("attach(ddp, sparse): ddp must wrap sparse itself (DistributedDataParallel(sparse))")
    if ddp.find_unused_parameters:
        raise ValueError("attach() replaces find_unused_parameters=True: build DistributedDataParallel(sparse) "
                         "without it")
    sparse.register_forward_hook(_keep_skipped_blocks_in_graph)
    sparse.integration = "ddp"


def _keep_skipped_blocks_in_graph(sparse: SparseModel, args, output):
    """Forward hook: route the outputs through :class:`_InGraph` with the skipped blocks' parameters."""
    skipper = sparse.runtimes.get("skip_layers")
    if not (sparse.training and torch.is_grad_enabled() and skipper and skipper.last_skipped):
        return output
    params = [p for i in skipper.last_skipped for p in skipper.modules[i].parameters() if p.requires_grad]
    reset = _ResetGradients([p for p in params if p.grad is None])
    leaves, spec = pytree.tree_flatten(output)
    leaves = [_InGraph.apply(leaf, reset, *params) if _differentiable(leaf) else leaf for leaf in leaves]
    return pytree.tree_unflatten(leaves, spec)


def _differentiable(leaf) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.requires_grad


class _ResetGradients:
    """Sets ``.grad = None`` on the given parameters once the running backward (DDP's copy-back included) is over."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.queued = params, False

    def queue(self) -> None:
        if self.queued:
            return
        self.queued = True
        # Callbacks run in the order queued, when the backward is over. DDP queues its copy-back of the reduced
        # buckets when its last bucket is ready, after this call; queueing from inside a callback runs after it.
        Variable._execution_engine.queue_callback(lambda: Variable._execution_engine.queue_callback(self._reset))

    def _reset(self) -> None:
        for p in self.params:
            p.grad = None


class _InGraph(torch.autograd.Function):
    """Identity on ``tensor`` whose graph also holds ``params``: their gradient from it is ``None``."""

    @staticmethod
    def forward(ctx, tensor, reset, *params):
        ctx.reset, ctx.count = reset, len(params)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.reset.queue()
        return (grad, None) + (None,) * ctx.count
