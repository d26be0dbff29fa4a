"""DeepSpeed ZeRO (stages 1-3) with skipped blocks: the gradients and updates of plain PyTorch.

    engine, optimizer, _, _ = deepspeed.initialize(model=sparse, optimizer=..., config=...)
    stsc.integrations.deepspeed.attach(engine, sparse)

Without :func:`attach`, a ``SparseModel`` whose policy skips blocks refuses to train under ZeRO
(``RuntimeError`` at the first training forward), because ZeRO gets a skipped block wrong:

* **Stale gradients.** ZeRO keeps gradients in buffers that live across optimizer steps and
  overwrites (first micro-batch of a step) or adds to (later ones) only the parts of parameters whose
  gradient hook fired. A block that did not run leaves its part as it was: ZeRO-3 steps it with the
  gradient of the last step in which it ran; with gradient accumulation, a block skipped in the first
  micro-batch and run in a later one gets that stale gradient plus the new one; with the optimizer
  offloaded to the CPU (stages 2 and 3) a block that ran in an earlier micro-batch but not in the
  last one has its gradient left on the device. :func:`attach` zeroes the accumulation buffers at
  every optimizer step and, with offload, copies every parameter's accumulated gradient to the
  optimizer before the step (DeepSpeed's own deferred copy), so the optimizer sees exactly the sum
  of the gradients of the micro-batches in which each block ran.
* **Zero instead of no gradient.** ZeRO's optimizer steps one flat tensor per parameter group, so a
  block that did not run at all in a step still gets a (zero) gradient: momentum and weight decay
  move it, and its optimizer state decays. :func:`attach` saves the skipped blocks' part of each flat
  tensor and of its optimizer state (every state tensor shaped like it) before the optimizer steps
  it, and puts them back after, so the block and its state are unchanged, as with ``.grad = None``
  in plain PyTorch. What remains different: the optimizer's step count (AdamW's bias correction)
  is one per flat tensor, so it counts every optimizer step for every block, where plain PyTorch
  counts only the steps a block took part in.

Not covered: NVMe offload (``offload_optimizer.device: nvme``), and DeepSpeed without ZeRO (stage 0:
use DDP and :mod:`stsc.integrations.ddp`). Importing this module does not import deepspeed.
"""

from __future__ import annotations

import torch

from stsc.sparse import SparseModel

__all__ = ["attach"]


def attach(engine, sparse: SparseModel) -> None:
    """Make DeepSpeed ZeRO train ``sparse``'s skipped blocks as plain PyTorch does; see the module docstring.

    ``engine``: the ``DeepSpeedEngine`` that ``deepspeed.initialize(model=sparse, ...)`` returned, or an
    optimizer wrapping its ZeRO optimizer (a Hugging Face Trainer's: :class:`~stsc.integrations.hf.StscCallback`
    calls this itself).
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine
    while not isinstance(zero, ZeROOptimizer) and hasattr(zero, "optimizer"):
        zero = zero.optimizer
    if not isinstance(zero, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        raise ValueError(f"attach() is for DeepSpeed ZeRO stages 1-3, and {type(engine).__name__} has no ZeRO optimizer "
                         f"(its optimizer is a {type(zero).__name__}); without ZeRO, use DistributedDataParallel and "
                         "stsc.integrations.ddp")
    stage3 = isinstance(zero, DeepSpeedZeroOptimizer_Stage3)
    offload = zero.offload_optimizer if stage3 else zero.cpu_offload
    if getattr(zero, "swap_optimizer", False):
        raise NotImplementedError("attach() does not support NVMe optimizer offload (offload_optimizer.device: nvme)")
    if sparse.report is None:
        raise ValueError("attach() needs the model captured: sparsify(model, policy, example_inputs) first")
    needed = ["grad_position", "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer"] if stage3 else \
        ["single_partition_of_fp32_groups"] + (["accumulated_grads_in_cpu"] if offload else [])
    missing = [name for name in needed + (["finalize_gradient_accumulation_boundary"] if offload else [])
               if not hasattr(zero, name)]
    if missing:
        import deepspeed

        raise NotImplementedError(f"attach() works with the ZeRO internals of deepspeed 0.19 (tested: 0.19.8); this "
                                  f"{type(zero).__name__} (deepspeed {deepspeed.__version__}) has no {', '.join(missing)}")
    _SkippedBlocks(zero, stage3, offload, sparse)
    sparse.integration = "deepspeed"


class _SkippedBlocks:
    """Tracks which blocks ran since the last optimizer step, and keeps ZeRO's step honest about the others."""

    def __init__(self, zero, stage3: bool, offload: bool, sparse: SparseModel):
        self.zero, self.stage3, self.offload = zero, stage3, offload
        blocks = [sparse.model.get_submodule(path) for path in sparse.report.model.blocks]
        self.all_blocks = set(range(len(blocks)))
        self.ran: set[int] = set()
        self.fragments: dict[torch.Tensor, list[tuple[int, int, int]]] = {}  # flat tensor -> (block, start, numel)
        for index, block in enumerate(blocks):
            for param in block.parameters():
                if param.requires_grad:
                    self._add_fragment(index, param)
        self.saved: list[tuple[torch.Tensor, list[tuple[int, int]], dict]] = []  # flat, spans, key -> values
        self.zero_step = zero.step
        zero.step = self.step
        for optimizer in filter(None, (zero.optimizer, getattr(zero, "backup_optimizer", None))):
            optimizer.register_step_pre_hook(self.save)
            optimizer.register_step_post_hook(self.restore)
        sparse.register_forward_hook(self.record)

    def _add_fragment(self, block: int, param: torch.nn.Parameter) -> None:
        """Where this rank's part of ``param`` lies in the flat tensor its optimizer steps."""
        if self.stage3:
            group, start, numel = self.zero.grad_position[self.zero.get_param_id(param)]
            flat = self.zero.fp32_partitioned_groups_flat[group]
        else:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                return  # no part of it in this rank's partition
            flat = self.zero.single_partition_of_fp32_groups[mapping.param_group_index]
            start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        self.fragments.setdefault(flat, []).append((block, start, numel))

    def record(self, sparse: SparseModel, args, output) -> None:
        """After each forward: the blocks a training forward ran."""
        if sparse.training and torch.is_grad_enabled():
            skipper = sparse.runtimes.get("skip_layers")
            self.ran |= self.all_blocks - set(skipper.last_skipped if skipper else ())

    def step(self, *args, **kwargs):
        """ZeRO's ``step``, with every accumulated gradient in place before and fresh buffers after."""
        if self.offload:  # copy gradients of blocks that ran only before the last micro-batch to the optimizer too
            self.zero.finalize_gradient_accumulation_boundary()
        try:
            return self.zero_step(*args, **kwargs)
        finally:
            self.ran = set()
            self._zero_accumulators()

    def _zero_accumulators(self) -> None:
        buffer = getattr(self.zero, "grad_partitions_flat_buffer", None)  # stage 3
        if buffer is not None:
            buffer.zero_()
        for grad in getattr(self.zero, "accumulated_grads_in_cpu", {}).values():  # stages 1-2, CPU offload
            grad.zero_()

    def save(self, optimizer, args, kwargs) -> None:
        """Before the optimizer steps: keep the skipped blocks' part of each flat tensor and of its state."""
        for group in optimizer.param_groups:
            for flat in group["params"]:
                spans = [(start, numel) for block, start, numel in self.fragments.get(flat, ()) if block not in self.ran]
                if spans:
                    self.saved.append((flat, spans, {key: [t.detach()[s:s + n].clone() for s, n in spans]
                                                     for key, t in _flat_state(optimizer, flat)}))

    @torch.no_grad()
    def restore(self, optimizer, args, kwargs) -> None:
        """After it: put them back (optimizer state this step created starts from zero there)."""
        for flat, spans, saved in self.saved:
            for key, tensor in _flat_state(optimizer, flat):
                for index, (start, numel) in enumerate(spans):
                    tensor[start:start + numel] = saved[key][index] if key in saved else 0
        self.saved = []


def _flat_state(optimizer, flat: torch.Tensor):
    """``(key, tensor)`` for the flat tensor itself (key ``None``) and each optimizer state tensor shaped like it."""
    yield None, flat
    for key, value in optimizer.state.get(flat, {}).items():
        if torch.is_tensor(value) and value.shape == flat.shape:
            yield key, value
