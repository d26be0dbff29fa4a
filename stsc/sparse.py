"""``sparsify(model, policy)``: the runtime that applies a stage policy's passes to a model.

A :class:`SparseModel` wraps the caller's model without copying it: its parameters are the
caller's tensors and ``state_dict()`` has the caller's keys, so a checkpoint loads into the original
model class. It captures and matches the model once (at construction when ``example_inputs`` are
given, else at the first forward), checks every stage's passes against the model (each is applied
once and removed, so a pass that cannot work fails now, not mid-training), and then keeps exactly
the active stage's passes installed:

* ``stage=None``: the stage follows training progress (:meth:`SparseModel.set_progress`; progress
  counts from the start of training, in the policy's unit); between or after stages the model is dense.
* ``stage="name"``: that stage only, as its own run (LLaVA recipes train alignment and instruction
  tuning as separate jobs); progress counts from the start of the stage.

In ``eval()`` every pass is inactive: the model is the dense original.

A model whose weights hold no data at ``sparsify`` (built on the ``meta`` device, or partitioned by DeepSpeed
``zero.Init``) is captured and matched from its weights' shapes alone (:func:`stsc.capture.shape_stand_ins`). What
needs data, the passes binding themselves to the model (each runs it once) and each stage's trial step, then runs at
the first training forward, on that batch, through the engine's own parameter fetch (ZeRO-3's, FSDP2's), by the same
code and with the same errors as at ``sparsify``. The engine owns the parameters' gradients there, so that trial
step's backward computes the gradients of the floating-point inputs only (through every activation of the stage).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import first_line, forward_kwargs, holds_data
from .errors import UnsupportedModelError, looking_for
from .lowering.graph import graph_problem
from .policy import Policy, Stage, load_policy
from .registry import PassInfo, get_pass
from .report import SPARSIFIED, Report, capture_and_match
from .savings import stage_expectation

__all__ = ["SparseModel", "SparseReport", "StageReport", "UnsupportedModelError", "model_loss", "sparsify"]

ON_EXAMPLE, ON_FIRST_BATCH = "the example inputs", "the first training batch"  # where the stages were checked


@dataclass
class StageReport:
    name: str
    unit: str
    start: float
    end: float
    passes: list[dict]  # name, params (as written), and what the pass did (PassInfo fields)
    sequence: int | None  # decoder sequence positions per sample, dense (at the example inputs)
    sequence_after: float | None  # ... with the stage's passes
    layers_run: float  # expected mean fraction of decoder blocks run over the stage
    decoder_flops_saved: float | None  # expected fraction of decoder FLOPs saved over the stage
    lowerings: dict = field(default_factory=dict)  # {"modules": "ok", "graph": "available" or why not}


@dataclass
class SparseReport:
    model: Report  # what capture and match found
    stages: list[StageReport] = field(default_factory=list)
    checked_on: str | None = None  # ON_EXAMPLE or ON_FIRST_BATCH; None: not yet (the weights held no data)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [self.model.format(), ""]
        if self.checked_on is None:
            lines.append("stages       not checked yet: the weights held no data at sparsify (matched from their "
                         "shapes); the passes bind and each stage's trial step runs at the first training forward")
        for s in self.stages:
            span = f"{s.unit} {s.start:g} to {s.end:g}"
            lines.append(f"stage {s.name!r}  ({span})")
            if not s.passes:
                lines.append("  passes       none (dense)")
            for p in s.passes:
                params = ", ".join(f"{k}={v}" for k, v in p["params"].items()) or "defaults"
                lines.append(f"  pass         {p['name']} ({params}): matched {p['matched']}")
                lines += [f"    {k:<30} {v:.4g}" if isinstance(v, float) else f"    {k:<30} {v}"
                          for k, v in p["details"].items()]
            if s.sequence is not None:
                lines.append(f"  expected     decoder sequence {s.sequence} -> {s.sequence_after:g} positions per sample, "
                             f"{100 * s.layers_run:.1f} % of decoder blocks run, "
                             f"decoder FLOPs -{100 * s.decoder_flops_saved:.1f} %")
            lines.append("  lowerings    " + "; ".join(f"{name}: {verdict}" for name, verdict in s.lowerings.items()))
        return "\n".join(lines)


class SparseModel(nn.Module):
    """The caller's model with a stage policy applied; see the module docstring."""

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: dict | None = None, stage: str | None = None,
                 steps_per_epoch: int | None = None, verify: bool = True):
        if isinstance(model, SparseModel):
            model = model.model  # refused as already sparsified, when it is captured
        super().__init__()
        self.model = model
        self.verify = verify
        self.policy = policy
        self.fixed_stage = policy.stage(stage) if stage is not None else None
        self.steps_per_epoch = steps_per_epoch
        self.progress = 0.0  # in the policy's unit; from the start of training, or of the fixed stage
        self.step = 0
        self.report: SparseReport | None = None
        self._structure = None
        self._inputs: dict | None = None
        self._active: Stage | None = None
        self._runtimes: dict[str, object] = {}
        self._compile_kwargs: dict | None = None
        self._warned_past_end = False
        self._pending_state: dict | None = None  # a schedule state loaded before the first capture
        self.integration: str | None = None  # the training engine an integration's attach() adapted this model to
        self._skips = any(entry.name == "skip_layers" for stage in ([self.fixed_stage] if self.fixed_stage else
                                                                     policy.stages) for entry in stage.passes)
        # `forward` carries the wrapped model's signature (trainers read it to pick the batch's columns)
        self.forward = _Forward(self)
        if example_inputs is not None:
            self._prepare(example_inputs)
        elif not holds_data(model):
            raise ValueError("sparsify() of a model whose weights hold no data here (on the meta device, or "
                             "partitioned by ZeRO-3) needs example_inputs, to capture it from their shapes before an "
                             "engine wraps it: one batch's forward keyword arguments, real tensors or on the meta device")

    # ------------------------------------------------------------------------------- public API
    @property
    def stage(self) -> str | None:
        """Name of the active stage (None: dense, between or after the stages); before the passes bind (at the first
        training forward of a model matched from shapes), the stage they will bind in."""
        stage = self._active if self.bound else self._selected_stage()
        return stage.name if stage else None

    @property
    def structure(self):
        """What the matcher found (:class:`stsc.Structure`; None before the first capture)."""
        return self._structure

    @property
    def bound(self) -> bool:
        """Whether the passes are bound to the model (at sparsify, or at the first training forward when the weights
        held no data at sparsify)."""
        return self.report is not None and self.report.checked_on is not None

    @property
    def runtimes(self) -> dict[str, object]:
        """The active stage's pass runtimes, by pass name (e.g. ``["skip_layers"].last_skipped``)."""
        return dict(self._runtimes)

    def set_progress(self, *, epoch: float | None = None, step: int | None = None) -> None:
        """Move the schedule: ``epoch`` (fractional epochs) and/or ``step`` (optimizer steps).

        ``step`` seeds the random draws (skip decisions, random compression). Progress is ``epoch``
        for epoch-counted policies (or ``step / steps_per_epoch`` when only ``step`` is given and
        ``steps_per_epoch`` was), ``step`` for step-counted ones.
        """
        if step is not None:
            self.step = int(step)
        if self.policy.unit == "steps":
            if step is not None:
                self.progress = float(step)
        elif epoch is not None:
            self.progress = float(epoch)
        elif step is not None and self.steps_per_epoch:
            self.progress = step / self.steps_per_epoch
        if self.bound:
            self._sync()

    def schedule_state(self) -> dict:
        """Everything needed to resume the schedule exactly (save it beside the checkpoint)."""
        return {"stage": self.stage, "progress": self.progress, "step": self.step,
                "passes": {name: runtime.state_dict() for name, runtime in self._runtimes.items()}}

    def load_schedule_state(self, state: dict) -> None:
        self.progress, self.step = float(state["progress"]), int(state["step"])
        if not self.bound:
            self._pending_state = state
            return
        self._sync()
        if self.stage != state["stage"]:
            raise ValueError(f"the saved schedule state is in stage {state['stage']!r}, but progress "
                             f"{self.progress:g} selects stage {self.stage!r} under this policy")
        for name, runtime in self._runtimes.items():
            runtime.load_state_dict(state["passes"][name])

    def compile(self, **compile_kwargs) -> None:
        """Regional compilation: ``torch.compile`` each decoder block's own forward, once per block kind.

        Pass guards stay outside compiled code, so skip patterns and stage switches cause no
        recompilation beyond one per distinct input shape and grad mode.
        """
        self._compile_kwargs = compile_kwargs
        if self._structure is not None:
            self._compile_blocks()

    def state_dict(self, *args, **kwargs):
        """The wrapped model's ``state_dict``: the same keys as the original model."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def without_passes(self):
        """The caller's model with no pass installed (e.g. to export it), the active stage's passes back after."""
        self._deactivate()
        try:
            yield self.model
        finally:
            self._sync()

    def unwrap(self) -> nn.Module:
        """Remove every pass and return the caller's model (dense, as it was, with trained weights).

        Call it when training with the policy is over: a later ``set_progress`` installs the passes again.
        """
        self._deactivate()
        if self._structure is not None:  # this wrapper captured the model: its mark is this wrapper's to lift
            SPARSIFIED.discard(self.model)
        return self.model

    def _forward(self, *args, **kwargs):
        if self._structure is None:
            if args:
                raise TypeError("sparsify() without example_inputs captures the model at its first call, which "
                                "needs keyword arguments only (e.g. model(**batch))")
            self._prepare(kwargs)
        if self.training and self._skips and self.integration is None and managed_by_zero(self.model):
            raise RuntimeError("this model trains under DeepSpeed ZeRO, whose optimizer would step the blocks that "
                               "skip_layers skips with stale or zero gradients: call "
                               "stsc.integrations.deepspeed.attach(engine, sparse) after deepspeed.initialize "
                               "(with the Hugging Face Trainer, StscCallback does it)")
        if not self.bound and self.training:
            self._bind(kwargs, ON_FIRST_BATCH)
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --------------------------------------------------------------------------------- internals
    @torch.compiler.disable
    def _prepare(self, example_inputs: dict) -> None:
        """Capture and match the model (from its weights' shapes when they hold no data), then bind if they do."""
        self._inputs = dict(example_inputs)
        self._structure, model_report = capture_and_match(self.model, self._inputs)
        SPARSIFIED.add(self.model)  # a later capture of it is refused: the passes are about to be installed on it
        self.report = SparseReport(model_report)
        try:
            if self._compile_kwargs is not None:
                self._compile_blocks()
            if holds_data(self.model):
                self._bind(self._inputs, ON_EXAMPLE)
        except BaseException:
            SPARSIFIED.discard(self.model)  # refused, nothing installed: the model may be sparsified again
            raise

    @torch.compiler.disable
    def _bind(self, inputs: dict, on: str) -> None:
        """Check every stage on ``inputs`` (its passes bind to the model, and its trial step runs), then install the
        stage that the progress selects."""
        if any(p.is_meta for p in self.model.parameters()):
            raise RuntimeError("the model's weights are still on the meta device at its first training forward: "
                               "materialize them (model.to_empty(device=...), then load the weights) before training")
        self._inputs = dict(inputs)
        self.report.checked_on = on
        stages = [self.fixed_stage] if self.fixed_stage else list(self.policy.stages)
        checked = []
        try:
            for stage in stages:
                with looking_for(f"stage {stage.name!r}: applying its passes to the model and checking them"):
                    checked.append(self._check_stage(stage, self.report.model))
        except BaseException:
            self.report.checked_on = None
            raise
        self.report.stages = checked
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self.load_schedule_state(pending)
        else:
            self._sync()

    def _check_stage(self, stage: Stage, model_report: Report) -> StageReport:
        """Apply the stage's passes once, run one training step on the inputs they bind on, then remove them: a pass
        that cannot work on this model fails now, not at training step N."""
        infos = self._activate(stage)
        try:
            if self.verify:
                self._trial_step(stage, infos)
        finally:
            self._deactivate()
        expected = stage_expectation(self._structure, stage.passes)
        graph = graph_problem(model_report.capture_method, model_report.fallback_reason, self._structure, stage,
                              self._inputs)
        return StageReport(
            stage.name, stage.unit, stage.start, stage.end,
            [{"name": e.name, "params": dict(e.params), "matched": info.matched, "details": info.details}
             for e, info in zip(stage.passes, infos)],
            expected.sequence, expected.sequence_after, expected.layers_run, expected.decoder_flops_saved,
            {"modules": "ok", "graph": f"not available: {graph}" if graph else "available (stsc.transform)"})

    def _trial_step(self, stage: Stage, infos: list[PassInfo]) -> None:
        """One training forward and backward of ``stage`` on the inputs it is checked on (each pass in its most
        demanding setting, e.g. every skippable block skipped); the model is left exactly as it was. On the first
        training batch the backward computes the floating-point inputs' gradients only (see the module docstring)."""
        on = self.report.checked_on
        try:
            with untouched(self.model), torch.enable_grad(), contextlib.ExitStack() as trials:
                for runtime in self._runtimes.values():
                    if hasattr(runtime, "trial"):
                        trials.enter_context(runtime.trial())
                inputs = forward_kwargs(self.model, self._inputs)[0]
                probes = {name: value.detach().requires_grad_() for name, value in inputs.items()
                          if on == ON_FIRST_BATCH and isinstance(value, torch.Tensor) and value.is_floating_point()}
                loss = model_loss(self.model(**{**inputs, **probes}))
                if on == ON_EXAMPLE and loss.requires_grad:
                    loss.backward()
                elif probes and loss.requires_grad:
                    torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the user gets it now, with what was found
            found = "; ".join(f"{info.name}: {_summary(info)}" for info in infos)
            raise UnsupportedModelError(
                f"stage {stage.name!r} ({', '.join(e.name for e in stage.passes)}): a training step on {on} "
                f"failed: {type(exc).__name__}: {first_line(exc)} (found: {found})") from exc

    def _selected_stage(self) -> Stage | None:
        return self.fixed_stage or self.policy.stage_at(self.progress)

    def _sync(self) -> None:
        """Install the passes of the stage that the progress selects, and move their schedules."""
        stage = self._selected_stage()
        if stage is None and self.progress >= self.policy.stages[-1].end and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"progress {self.progress:g} {self.policy.unit} is past the end of the last stage "
                          f"{self.policy.stages[-1].name!r} ({self.policy.stages[-1].end:g}): the model runs dense",
                          stacklevel=3)
        if stage is not self._active:
            self._deactivate()
            if stage is not None:
                self._activate(stage)
        within = self.progress if self.fixed_stage else self.progress - (stage.start if stage else 0.0)
        for runtime in self._runtimes.values():
            runtime.set_progress(epoch=within, step=self.step)

    def _activate(self, stage: Stage) -> list[PassInfo]:
        infos = []
        with eval_mode(self.model):  # passes that run the model to bind themselves see it dense
            for entry in stage.passes:
                try:  # a pass says why it cannot work here with a ValueError
                    with looking_for(f"stage {stage.name!r}, pass {entry.name}", as_is=(ValueError,)):
                        runtime, info = get_pass(entry.name).apply(self.model, self._structure, entry.config,
                                                                   self._inputs)
                except UnsupportedModelError:
                    self._deactivate()
                    raise
                self._runtimes[entry.name] = runtime
                infos.append(info)
        self._active = stage
        return infos

    def _deactivate(self) -> None:
        for runtime in reversed(list(self._runtimes.values())):
            runtime.remove()
        self._runtimes, self._active = {}, None

    def _compile_blocks(self) -> None:
        active = self._active
        self._deactivate()  # guards wrap whatever forward a block has: compile underneath them
        modules = dict(self.model.named_modules())
        for block in self._structure.blocks:
            module = modules[block.path]
            if not getattr(module.forward, "stsc_compiled", False):
                module.forward = torch.compile(module.forward, **self._compile_kwargs)
                module.forward.stsc_compiled = True
        if active is not None:
            self._activate(active)
            self._sync()


class _Forward:
    """``SparseModel.forward``: runs :meth:`SparseModel._forward`, shows the wrapped model's signature."""

    def __init__(self, owner: SparseModel):
        self.owner = owner

    def __call__(self, *args, **kwargs):
        return self.owner._forward(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.owner.model.forward)


def managed_by_zero(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO manages the parameters (stage 3 partitions them; stages 1-2 map them to a flat partition)."""
    return "deepspeed" in sys.modules and any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
                                              for p in model.parameters())


@contextlib.contextmanager
def untouched(model: nn.Module):
    """Run something that trains ``model`` for one step, then put back its modes, gradients, buffers and the RNG."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    model.train()
    for p, _ in grads:
        p.grad = None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad in grads:
            p.grad = grad
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


def model_loss(output) -> torch.Tensor:
    """The model's loss, or a stand-in (the mean square of its first floating-point output) without one."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return leaves[0].float().pow(2).mean()


def _summary(info: PassInfo) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.details.items() if not isinstance(v, (dict, list)) or len(str(v)) < 80)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run something with every module of ``model`` in eval mode, then put back each module's own mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def sparsify(model: nn.Module, policy: Policy | str, example_inputs: dict | None = None, stage: str | None = None,
             steps_per_epoch: int | None = None, verify: bool = True) -> SparseModel:
    """Apply a stage ``policy`` (a :class:`Policy`, a YAML path or a preset name) to ``model``.

    ``example_inputs``: forward kwargs of one batch, for capture (default: the first batch seen).
    ``stage``: run only this stage (a separate run); default: the stage follows :meth:`SparseModel.set_progress`.
    ``steps_per_epoch``: lets ``set_progress(step=...)`` alone move an epoch-counted policy.
    ``verify``: run one training forward and backward of every stage on the example inputs before returning
    (the model is left as it was), so a pass that does not fit the model fails now with
    :class:`UnsupportedModelError`, not at training step N.
    """
    return SparseModel(model, load_policy(policy), example_inputs, stage, steps_per_epoch, verify)
