"""Layer Dynamic Skipper: guarded skip branches around the decoder blocks.

**Matches** the decoder blocks that :func:`stsc.match` found (``Structure.blocks``): repeated residual
blocks on the token stream. Each block's hidden-state argument and hidden-state output are located
by running the model once on the example inputs with hooks on the blocks (the argument whose tensor
has the output's shape, preferring the previous block's output itself).

**Rewrites** each block's call (``_call_impl`` on the instance: what ``nn.Module.__call__`` runs,
hooks and then ``forward``; the module, its class, its parameters and its ``state_dict`` keys stay as
they are) into the guarded branch::

    skip[i] ? hidden_in : block(hidden_in, ...)

A skipped block computes nothing: neither its forward nor its backward runs, and its output is its
hidden-state input (the residual identity), inside the block's usual output structure. The guard
sits before the block's hooks, so a skipped block runs none of them: FSDP2's pre-forward all-gather
(and its post-backward reduce-scatter) and DeepSpeed ZeRO-3's parameter fetch are skipped with it.

A block that returns other tensors besides its hidden state (a selection of keys that the next block reads, or
passes on itself) can be skipped where it receives each of them from the block before it: skipped, it passes those
on unchanged, as the stack without it would. Otherwise it is kept, and its reason says so; so is a block a later
block reads besides what it returns (keys and values kept in a store: no passed-on output has their shape and dtype).

A block whose keys and values a block of another stack reads (``Block.partners``: a vision-language-action model's
action expert, its layer ``i`` attending to the decoder's layer ``i``) is skipped together with those partners,
each guarded the same way: the layer is skipped in both stacks, as if the joint stack did not have it. The first
such block always runs: the partners size their attention by the length of its entry in the shared cache (a shape read,
which the data flow does not show).

**Decisions** are drawn once per training forward (of the model, or of its backbone where a trainer calls that
directly: :mod:`stsc.forwards`), before the first block runs, from a generator
seeded by ``(seed, step, micro_step)`` (:func:`stsc.schedules.draw_skips`): identical on every rank,
reproducible after a resume. ``step`` is set with :meth:`LayerSkipper.set_progress`; ``micro_step``
counts the training forwards since then. In ``eval()`` nothing is skipped: the model is the dense one.

**Gradients**: a block skipped in a forward gets no gradient from it. A block skipped in every
micro-batch of an optimizer step keeps ``.grad = None`` (with ``zero_grad(set_to_none=True)``, the
default), so AdamW leaves it alone: no momentum step and no weight decay. (``torch.cond`` would give
zeros instead, which AdamW still applies.)

**torch.compile**: the guard runs outside compiled code (``torch.compiler.disable``), so a compiled
model graph-breaks at each block and never guards on a skip pattern: any pattern runs without
recompiling. :meth:`stsc.SparseModel.compile` compiles the blocks themselves underneath the guards
(regional compilation: one compiled block serves every block of the same kind), so a skipped block
still saves its time when compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, fields

import torch
import torch.utils._pytree as pytree
from torch import nn

from stsc.capture import forward_kwargs
from stsc.forwards import ForwardScope, forward_modules
from stsc.registry import PassInfo, register_pass
from stsc.savings import Savings
from stsc.schedules import SkipSchedule, StepClock, draw_skips, layer_probabilities, mean_skip_fraction

__all__ = ["LayerSkipper", "SkipLayersConfig", "apply", "estimate"]


@dataclass(frozen=True)
class SkipLayersConfig(SkipSchedule):
    """Parameters of the pass: the schedule (see :class:`stsc.schedules.SkipSchedule`), plus:

    ``skip_kinds``: block kinds that may be skipped (kind 0 is the first block's shape); ``None``
    means every kind. Mixed stacks (self- and cross-attention layers) can keep one kind dense.
    ``seed``: seed of the decision generator, shared by all ranks.
    """

    skip_kinds: tuple[int, ...] | None = None
    seed: int = 0

    def allows_kind(self, kind: int) -> bool:
        return self.skip_kinds is None or kind in self.skip_kinds

    def may_skip(self, block) -> bool:
        """Whether a matched block can be guarded: of an allowed kind, and no other block reads its side values."""
        return self.allows_kind(block.kind) and not block.feeds

    def skip_schedule(self) -> SkipSchedule:
        return SkipSchedule(**{f.name: getattr(self, f.name) for f in fields(SkipSchedule)})


@dataclass(frozen=True)
class _Binding:
    """Where a block's hidden state goes in and comes out."""

    arg: int | str  # positional index or keyword name of the hidden-state argument
    out_leaf: int  # index of the hidden state among the output's pytree leaves
    out_spec: pytree.TreeSpec
    out_leaves: tuple  # the other (non-tensor) leaves of the output, reproduced when skipping
    passed_on: tuple = ()  # (output leaf, argument) of each other tensor output: the argument it passes on skipped
    passed_to: tuple[int, ...] = ()  # the later blocks that receive one of those outputs as an argument
    passed_values: tuple = ()  # (shape, dtype) of those outputs

    def hidden(self, args, kwargs) -> torch.Tensor:
        return _argument(args, kwargs, self.arg)

    def identity(self, args, kwargs):
        """The skipped block's output: its hidden-state input, and the other tensors it receives passed on."""
        leaves = list(self.out_leaves)
        leaves[self.out_leaf] = self.hidden(args, kwargs)
        for leaf, arg in self.passed_on:
            leaves[leaf] = _argument(args, kwargs, arg)
        return pytree.tree_unflatten(leaves, self.out_spec)


def _argument(args, kwargs, where: int | str):
    return args[where] if isinstance(where, int) else kwargs[where]


class LayerSkipper:
    """Runtime of the pass: schedule state, skip decisions, and the guarded blocks."""

    def __init__(self, starts: list[nn.Module], blocks: list[tuple[str, nn.Module]], bindings: list[_Binding | None],
                 skippable: list[bool], config: SkipLayersConfig, partners: list[tuple[int, nn.Module, _Binding]] = ()):
        self.config = config
        self.schedule = config.skip_schedule()
        self.paths = [path for path, _ in blocks]
        self.modules = [module for _, module in blocks]
        self.partners = [module for _, module, _ in partners]  # guarded with the block of their index
        self.skippable = skippable
        self.progress = 0.0  # epochs into the stage
        self.clock = StepClock()
        self.forced: list[int] | None = None
        self.last_skipped: list[int] = []
        self._skip = [False] * len(blocks)
        for index, (module, binding) in enumerate(zip(self.modules, bindings)):
            if binding is not None:
                module._call_impl = _GuardedCall(self, index, binding)
        for partner, (index, module, binding) in enumerate(partners):
            module._call_impl = _GuardedCall(self, index, binding, partner)
        self._scope = ForwardScope(starts, self._before_forward)  # the model, or its backbone called directly

    # ----------------------------------------------------------------------------- schedule state
    def set_progress(self, *, epoch: float | None = None, step: int | None = None) -> None:
        """Move the schedule: ``epoch`` = epochs completed in the stage (fractional), ``step`` = global step."""
        if epoch is not None:
            self.progress = float(epoch)
        if step is not None:
            self.clock.set_step(step)

    def probabilities(self) -> list[float]:
        return self.probabilities_at(self.progress)

    def probabilities_at(self, progress: float) -> list[float]:
        """Each block's skip probability at ``progress`` epochs into the stage."""
        return layer_probabilities(self.schedule, len(self.modules), progress, self.skippable)

    def force(self, skipped: list[int] | None) -> None:
        """Skip exactly these block indices in every training forward (``None``: back to the schedule)."""
        self.forced = None if skipped is None else sorted(skipped)

    def state_dict(self) -> dict:
        return {"progress": self.progress, **self.clock.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.progress = float(state["progress"])
        self.clock.load_state_dict(state)

    # ------------------------------------------------------------------------------------ runtime
    def _before_forward(self, module, args, kwargs):
        if not module.training:
            self._skip = [False] * len(self.modules)
            return
        if self.forced is not None:
            skipped = self.forced
        else:
            skipped = draw_skips(self.probabilities(), self.config.seed, *self.clock.tick(), self.schedule.min_kept)
        self.last_skipped = skipped
        self._skip = [i in skipped for i in range(len(self.modules))]

    def trial_pattern(self) -> list[int]:
        """The most demanding pattern: every block the schedule may skip, as many as ``min_kept`` allows."""
        may_skip = [i for i, p in enumerate(self.probabilities_at(0.0)) if p > 0]
        return may_skip[: len(self.modules) - self.schedule.min_kept]

    @contextlib.contextmanager
    def trial(self):
        """Around sparsify's trial step: skip :meth:`trial_pattern`, and fail unless exactly those were skipped."""
        pattern = self.trial_pattern()
        forced, self.forced = self.forced, pattern
        try:
            yield
        finally:
            self.forced = forced
        if self.last_skipped != pattern:
            raise ValueError(f"blocks {pattern} were to be skipped, {self.last_skipped} were")

    def remove(self) -> None:
        """Undo the rewrite: blocks are called as before (hooks, then forward)."""
        for module in self.modules + self.partners:
            module.__dict__.pop("_call_impl", None)
        self._scope.remove()


class _GuardedCall:
    """A block's ``_call_impl`` with the skip guard in front. An object rather than a closure, so that a
    deep copy of the model guards its own blocks (with its own skipper), not the original's. ``partner``: the index of
    the partner block it guards instead (skipped with block ``index``)."""

    def __init__(self, skipper: LayerSkipper, index: int, binding: _Binding, partner: int | None = None):
        self.skipper, self.index, self.binding, self.partner = skipper, index, binding, partner

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        module = self.skipper.modules[self.index] if self.partner is None else self.skipper.partners[self.partner]
        if module.training and self.skipper._skip[self.index]:
            return self.binding.identity(args, kwargs)
        return nn.Module._call_impl(module, *args, **kwargs)


def bind_blocks(model: nn.Module, blocks: list[nn.Module], example_inputs: dict) -> list[_Binding | None]:
    """Run the model once and locate each block's hidden-state argument and output leaf."""
    calls: dict[int, tuple] = {}

    def record(index):
        def hook(module, args, kwargs, output):
            calls.setdefault(index, (args, kwargs, output))
        return hook

    handles = [block.register_forward_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(**forward_kwargs(model, example_inputs)[0])
    finally:
        for handle in handles:
            handle.remove()
    bindings, previous, hidden = [], [], None
    for index in range(len(blocks)):
        if index not in calls:
            bindings.append(None)
            previous, hidden = [], None
            continue
        args, kwargs, output = calls[index]
        binding = _binding_of(args, kwargs, output, previous, hidden)
        if binding is not None and binding.passed_on:
            passed = [pytree.tree_leaves(output)[leaf] for leaf, _ in binding.passed_on]
            binding = dataclasses.replace(binding, passed_to=tuple(
                later for later in range(index + 1, len(blocks)) if later in calls
                and any(value is tensor for value in pytree.tree_leaves(calls[later][:2]) for tensor in passed)),
                passed_values=tuple((tuple(tensor.shape), tensor.dtype) for tensor in passed))
        bindings.append(binding)
        previous = pytree.tree_leaves(output)
        hidden = previous[binding.out_leaf] if binding else None
    return bindings


def _binding_of(args, kwargs, output, previous: list, hidden_before) -> _Binding | None:
    """Where the hidden state goes in and comes out (preferring the block before's hidden output ``hidden_before``
    as the argument), or None where another tensor of the output is not what this block received from the block
    before (``previous``: the leaves of its output) at the same place."""
    leaves, spec = pytree.tree_flatten(output)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    arguments = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
    candidates = [(where, t) for where, t in arguments if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if hidden_before is not None:
        candidates.sort(key=lambda c: c[1] is not hidden_before)
    for where, tensor in candidates:
        for leaf in tensors:
            if leaves[leaf].shape == tensor.shape and leaves[leaf].dtype == tensor.dtype:
                passed_on = [(i, _received(arguments, previous[i] if i < len(previous) else None))
                             for i in tensors if i != leaf]
                if any(arg is None for _, arg in passed_on):
                    return None  # another tensor output cannot be reproduced without running the block
                return _Binding(where, leaf, spec, tuple(None if i in tensors else v for i, v in enumerate(leaves)),
                                tuple(passed_on))
    return None


def _received(arguments, value) -> int | str | None:
    """Which argument is ``value`` itself (None: none, or ``value`` is not a tensor)."""
    if not isinstance(value, torch.Tensor):
        return None
    return next((where for where, argument in arguments if argument is value), None)


def _not_skippable(block, binding: _Binding | None, config: SkipLayersConfig, partners: dict,
                   first_partnered: bool) -> str | None:
    """Why ``block`` cannot be skipped (None when it can); ``partners``: the binding of each partner block;
    ``first_partnered``: ``block`` is the first block with partners."""
    if binding is None:
        return ("its output has other tensors besides the hidden state that it does not receive from the block "
                "before it (to pass them on when skipped), or it did not run")
    unbound = [path for path in block.partners if partners[path] is None]
    if unbound:
        return (f"blocks {unbound} of another stack read its keys and values and cannot be skipped with it (their "
                "output has other tensors besides the hidden state, or they did not run)")
    if first_partnered:
        return (f"blocks {list(block.partners)} of another stack read its keys and values, and size their attention by "
                "the length of its entry in the cache")
    if set(block.feeds) - set(binding.passed_to) or set(block.side_values) - set(binding.passed_values):
        return f"blocks {list(block.feeds)} read values it computes besides its output (e.g. shared keys and values)"
    if not config.allows_kind(block.kind):
        return "its kind is not in skip_kinds"
    return None


def estimate(structure, config: SkipLayersConfig) -> Savings:
    """Blocks run over the stage, assuming every block of an allowed kind can be guarded."""
    skippable = [config.may_skip(block) for block in structure.blocks]
    return Savings(layers_run=1 - mean_skip_fraction(config.skip_schedule(), skippable))


def check(structure) -> str | None:
    """Why the pass cannot work on ``structure`` (None when it can)."""
    return None if structure.blocks else "; ".join(n for n in structure.notes if n.startswith("no decoder blocks"))


@register_pass("skip_layers", SkipLayersConfig, estimate, check)
def apply(model: nn.Module, structure, config: SkipLayersConfig, example_inputs: dict) -> tuple[LayerSkipper, PassInfo]:
    """Guard every decoder block of ``structure`` in ``model``; return the runtime and what was done."""
    problem = check(structure)
    if problem:
        raise ValueError(problem)
    if config.min_kept > len(structure.blocks):
        raise ValueError(f"min_kept {config.min_kept} is more than the {len(structure.blocks)} decoder blocks")
    modules = dict(model.named_modules())
    blocks = [(b.path, modules[b.path]) for b in structure.blocks]
    bindings = bind_blocks(model, [m for _, m in blocks], example_inputs)
    paths = [path for block in structure.blocks for path in block.partners]
    partners = dict(zip(paths, bind_blocks(model, [modules[p] for p in paths], example_inputs) if paths else []))
    first = next((block for block in structure.blocks if block.partners), None)
    reasons = [_not_skippable(block, binding, config, partners, block is first)
               for block, binding in zip(structure.blocks, bindings)]
    skippable = [reason is None for reason in reasons]
    guarded = [(index, modules[path], partners[path]) for index, block in enumerate(structure.blocks)
               if skippable[index] for path in block.partners]
    skipper = LayerSkipper(forward_modules(model, structure), blocks, bindings, skippable, config, guarded)
    if not any(p > 0 for p in skipper.probabilities_at(0.0)):
        skipper.remove()
        raise ValueError(f"no decoder block can be skipped: {len(blocks)} blocks, never_skip_first="
                         f"{config.never_skip_first}, never_skip_last={config.never_skip_last}, skip_kinds="
                         f"{config.skip_kinds}, {sum(skipper.skippable)} with a skippable output, alpha={config.alpha}")
    info = PassInfo("skip_layers", sum(skipper.skippable), {
        "blocks": len(blocks),
        "skippable": [p for p, s in zip(skipper.paths, skipper.skippable) if s],
        "not_skippable": {path: reason for path, reason in zip(skipper.paths, reasons) if reason},
        "schedule": config.skip_schedule().__dict__,
        "at_most_skipped_per_step": min(sum(skipper.skippable), len(blocks) - config.min_kept),
        "mean_skip_fraction_over_stage": mean_skip_fraction(skipper.schedule, skipper.skippable),
    })
    return skipper, info
