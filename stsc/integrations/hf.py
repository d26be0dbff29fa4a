"""Hugging Face ``Trainer`` integration: a callback that moves a :class:`stsc.SparseModel`'s schedule.

    from stsc.integrations.hf import StscCallback
    sparse = stsc.sparsify(model, "sts", example_inputs)
    trainer = Trainer(model=sparse, args=args, train_dataset=data, callbacks=[StscCallback(sparse)])

Before every optimizer step the callback calls ``sparse.set_progress(epoch=state.epoch,
step=state.global_step)``: the stage and the schedule follow the trainer's own progress, so a run
resumed from a Trainer checkpoint makes the same decisions as an uninterrupted one (decisions depend
only on the policy seed, the step and the micro-batch within it). When the Trainer runs DeepSpeed
ZeRO (``TrainingArguments(deepspeed=...)``), the callback calls
:func:`stsc.integrations.deepspeed.attach` with the Trainer's optimizer as training begins. Importing
this module imports transformers; ``stsc`` itself never does.
"""

from __future__ import annotations

from transformers import TrainerCallback

from stsc.sparse import SparseModel, managed_by_zero

__all__ = ["StscCallback"]


class StscCallback(TrainerCallback):
    def __init__(self, sparse: SparseModel):
        self.sparse = sparse
        self.stages: list[tuple[int, str | None]] = []  # (global step, stage) at each optimizer step

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.sparse.integration is None and managed_by_zero(self.sparse.model):
            from stsc.integrations.deepspeed import attach

            attach(optimizer, self.sparse)
        self._sync(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync(state)

    def _sync(self, state) -> None:
        self.sparse.set_progress(epoch=state.epoch or 0.0, step=state.global_step)
        self.stages.append((state.global_step, self.sparse.stage))
