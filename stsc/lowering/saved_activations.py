"""Guarded blocks that keep their activations: a ``torch.cond`` skip branch without a second forward.

``torch.cond``'s autograd (torch 2.13, ``CondAutogradOp``) saves only the branch's operands and runs the taken
branch's forward again inside its backward: under the graph lowering a block that runs costs two forwards and a
backward, and skipping a sixth of the blocks saves nothing. :func:`keep_activations` rewrites each guarded block
of a graph lowered by :mod:`stsc.lowering.graph` (``torch.cond(skip[i], identity, block, operands)``) as a call of
a :class:`torch.autograd.Function` holding two ``torch.cond``\\ s over the block's joint graph, partitioned as
AOTAutograd partitions a model (``min_cut_rematerialization_partition``):

* forward: ``cond(skip, skip_forward, block_forward, operands)``: the block's forward returns its output and
  the activations its backward reads (each as its memory, flat); the skip branch returns the hidden state and
  uninitialised tensors of the same sizes (``torch.empty``: never read);
* backward: ``cond(skip, skip_backward, block_backward, operands + activations + gradient)``: the block's
  backward from its saved activations; the skip branch passes the gradient through and gives the other
  operands zeros, as ``torch.cond``'s own backward does.

Activations the backward needs that are operands, or views of them (a weight's transpose), are not routed
through the conds (a branch may not return an alias of its input): the function saves the operands and the
backward recomputes the views, as it recomputes views of the routed activations and the sizes it reads
(from the tensors it receives). A block whose partition does not fit this form keeps its ``torch.cond`` (said in
the returned notes). Which operands get a
gradient is read from the graph (a parameter with ``requires_grad``, or a value computed from one), so the
rewrite is redone when the caller freezes or unfreezes parameters.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._higher_order_ops.partitioner import create_hop_joint_graph
from torch._higher_order_ops.utils import materialize_as_graph
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._sympy.functions import FloorDiv, Max, Min

from stsc.capture import first_line

__all__ = ["PartitionedBlock", "keep_activations", "partition_block"]

_cond = torch.ops.higher_order.cond


@dataclass
class PartitionedBlock:
    """A guarded block's four branch graphs; ``grads`` marks the operands that get a gradient."""

    forward: fx.GraphModule  # operands -> (output, *activations)
    skip_forward: fx.GraphModule  # operands -> (hidden, *placeholders shaped like the activations)
    backward: fx.GraphModule  # (*operands, *activations, grad) -> gradients of the operands in ``grads``
    skip_backward: fx.GraphModule  # the same inputs -> (grad, zeros, ...)
    grads: tuple[bool, ...]

    def function(self, name: str):
        """``name(skip, *operands) -> output``: this block run under a skip flag, as an autograd function."""
        block = self

        class GuardedBlock(torch.autograd.Function):
            @staticmethod
            def forward(ctx, skip, *operands):
                output, *activations = _cond(skip, block.skip_forward, block.forward, tuple(operands))
                ctx.save_for_backward(skip, *operands, *activations)
                return output

            @staticmethod
            def backward(ctx, grad):
                skip, *saved = ctx.saved_tensors
                grads = iter(_cond(skip, block.skip_backward, block.backward, (*saved, grad)))
                return None, *(next(grads) if wanted else None for wanted in block.grads)

        def run(skip, *operands):
            return GuardedBlock.apply(skip, *operands)

        run.__name__ = run.__qualname__ = name  # the name the graph's code calls it by
        run.block = block
        return run


class NotPartitioned(ValueError):
    """The block's partition does not fit the two-cond form (it keeps its ``torch.cond``)."""


def _storage(value):
    return StorageWeakRef(value.untyped_storage()) if isinstance(value, torch.Tensor) else None


_COMBINE = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv, Min: torch.sym_min,
            Max: torch.sym_max}


def _evaluate(size, symbols: dict):
    """``size`` (an int or a SymInt) rebuilt from ``symbols`` (basic symbol -> a traced SymInt), by traced
    arithmetic."""
    def rebuild(expr):
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return symbols[expr]
        if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:  # products: a traced SymInt's ** is not traced
            return functools.reduce(operator.mul, [rebuild(expr.base)] * int(expr.exp))
        combine = next((f for kind, f in _COMBINE.items() if isinstance(expr, kind)), None)
        if combine is None:
            raise NotPartitioned(f"a size the branches cannot rebuild: {expr}")
        return functools.reduce(combine, map(rebuild, expr.args))
    return size if isinstance(size, int) else rebuild(sympy.sympify(size.node.expr))


def _symbols(tensors) -> dict:
    """Basic symbol -> a traced SymInt, read off the sizes of ``tensors`` that are a symbol, or else a symbol plus a
    constant (the length of a compacted sequence: the full length minus the positions dropped)."""
    symbols = {}
    for size in (size for t in tensors for size in t.shape if isinstance(size, torch.SymInt)):
        expr = size.node.expr
        if expr.is_Symbol:
            symbols[expr] = size
        elif len(expr.free_symbols) == 1:
            (symbol,) = expr.free_symbols
            if (expr - symbol).is_Integer:
                symbols.setdefault(symbol, size - int(expr - symbol))
    return symbols


def _base(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` views (itself if it is no view)."""
    while node.op != "placeholder" and node.all_input_nodes:
        source = node.all_input_nodes[0]
        value, source_value = node.meta["val"], source.meta.get("val")
        if not (isinstance(value, torch.Tensor) and isinstance(source_value, torch.Tensor)
                and _storage(value) == _storage(source_value)):
            break
        node = source
    return node


def _sizes(sizes, symbols: dict) -> list:
    return [_evaluate(s, symbols) for s in sizes]


def _numel(value: torch.Tensor, symbols: dict):
    return functools.reduce(operator.mul, _sizes(value.shape, symbols), 1)


def _backward_core(forward: fx.GraphModule, backward: fx.GraphModule, grads: list[bool]
                   ) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The partitioned ``backward`` as ``(*operands, *bases, grad) -> the wanted gradients``, and the bases: the
    forward's nodes it reads, other than operands. Views of operands and bases, and sizes, are recomputed."""
    fw_inputs = list(forward.graph.find_nodes(op="placeholder"))
    _, *activations = forward.graph.find_nodes(op="output")[0].args[0]
    bw_inputs = list(backward.graph.find_nodes(op="placeholder"))
    graph, inputs = fx.Graph(), {}
    for i, node in enumerate(fw_inputs):
        inputs[node] = graph.placeholder(f"operand_{i}")
        inputs[node].meta["val"] = node.meta["val"]
    bases = list(dict.fromkeys(_base(a) for a in activations if isinstance(a.meta["val"], torch.Tensor)))
    bases = [b for b in bases if b.op != "placeholder"]
    for i, node in enumerate(bases):
        inputs[node] = graph.placeholder(f"saved_{i}")
        inputs[node].meta["val"] = node.meta["val"]
    grad = graph.placeholder("grad")
    grad.meta["val"] = bw_inputs[-1].meta["val"]
    placeholders = list(graph.nodes)

    def recompute(node: fx.Node) -> fx.Node:  # a view of an operand or a saved base, copied from the forward
        if node not in inputs:
            inputs[node] = graph.node_copy(node, recompute)
        return inputs[node]

    env = {bw_inputs[-1]: grad}
    for activation, bw_input in zip(activations, bw_inputs):
        value = activation.meta["val"]
        if isinstance(value, torch.SymInt):
            source = next(((p, d) for p in placeholders for d, s in enumerate(p.meta["val"].shape)
                           if isinstance(s, torch.SymInt) and s.node.expr == value.node.expr), None)
            if source is None:
                raise NotPartitioned(f"the backward reads a size it cannot take from a tensor: {value}")
            env[bw_input] = graph.call_function(torch.ops.aten.sym_size.int, source)
        else:
            env[bw_input] = recompute(activation)
    for node in backward.graph.nodes:
        if node.op == "output":
            results = [r for r, wanted in zip(node.args[0], grads) if wanted]
            if any(r is None for r in results):
                raise NotPartitioned("an operand that needs a gradient gets none")
            storages = {_storage(p.meta["val"]) for p in placeholders}
            graph.output(tuple(graph.call_function(torch.ops.aten.clone.default, (env[r],))
                               if _storage(r.meta["val"]) in storages else env[r] for r in results))
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.eliminate_dead_code()
    for base in bases:
        if not inputs[base].users:
            graph.erase_node(inputs[base])
    return fx.GraphModule(backward, graph), [b for b in bases if inputs[b] in graph.nodes]


def partition_block(block: fx.GraphModule, operands: list[torch.Tensor], grads: list[bool]) -> PartitionedBlock:
    """Partition ``block`` (operand 0 its hidden state, its output the new hidden state, flattened as the
    graph lowering's guarded blocks return it) into the four branch graphs.

    ``operands`` are the fake values of its operands (symbolic sizes: the graphs serve every sequence length),
    ``grads`` which of them get a gradient. The activations pass between the conds as their memory, flat (so
    the two forward branches agree on their layout; the backward views them with their own strides), once
    per storage; views of them, views of the operands and sizes are recomputed in the backward. Raises
    :class:`NotPartitioned` when it does not fit.
    """
    fake_mode = operands[0].fake_mode
    with fake_mode:
        args = tuple(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).requires_grad_(g)
                     for v, g in zip(operands, grads))
        parts = create_hop_joint_graph(block, args, functionalize=False).partition(
            min_cut_rematerialization_partition, always_recompute_complex_exprs=True)
    forward, backward = parts.fw_gm, parts.bw_gm
    fw_inputs = list(forward.graph.find_nodes(op="placeholder"))
    output_node = forward.graph.find_nodes(op="output")[0]
    output, *activations = output_node.args[0]
    bw_inputs = list(backward.graph.find_nodes(op="placeholder"))
    if len(bw_inputs) != len(activations) + 1:
        raise NotPartitioned(f"the block has {len(bw_inputs) - len(activations)} outputs, not one")

    core_backward, used = _backward_core(forward, backward, grads)
    output_node.args = ((output, *used),)  # after the backward copied what it recomputes
    forward.graph.eliminate_dead_code()
    forward.recompile()

    values, output_value = [b.meta["val"] for b in used], output.meta["val"]
    shared = {_storage(output_value)}
    copies = []  # a branch may not return two views of one storage: the later ones are copied
    for value in values:
        if not is_non_overlapping_and_dense_or_false(value) or value.storage_offset() != 0:
            raise NotPartitioned(f"an activation is not one dense tensor: {tuple(value.shape)}, {value.stride()}")
        copies.append(_storage(value) in shared)
        shared.add(_storage(value))

    contiguous = [v.is_contiguous() for v in values]  # read here: not on the traced tensors

    def block_forward(*operands):
        output, *saved = forward(*operands)
        symbols = _symbols(operands)
        return (output, *(torch.as_strided(t.clone() if copy else t, (_numel(v, symbols),), (1,))
                          for t, v, copy in zip(saved, values, copies)))

    def skip_forward(*operands):  # the hidden state, in the shape the block returns it (flat)
        symbols = _symbols(operands)
        return (operands[0].reshape(_sizes(output_value.shape, symbols)).clone(),
                *(torch.empty(_numel(v, symbols), dtype=v.dtype, device=v.device) for v in values))

    def block_backward(*inputs):
        operands, flat, grad = inputs[:len(fw_inputs)], inputs[len(fw_inputs):-1], inputs[-1]
        symbols = _symbols((*operands, grad))
        saved = [t.view(_sizes(v.shape, symbols)) if plain else
                 torch.as_strided(t, _sizes(v.shape, symbols), _sizes(v.stride(), symbols))
                 for t, v, plain in zip(flat, values, contiguous)]
        return core_backward(*operands, *saved, grad)

    def skip_backward(*inputs):
        operands, grad = inputs[:len(fw_inputs)], inputs[-1]
        return tuple(grad.reshape(operand.shape).clone() if i == 0 else torch.zeros_like(operand)
                     for i, (operand, wanted) in enumerate(zip(operands, grads)) if wanted)

    with fake_mode:
        symbols = _symbols(args)
        flat = tuple(torch.empty(_numel(v, symbols), dtype=v.dtype, device=v.device) for v in values)
        backward_inputs = (*args, *flat, bw_inputs[-1].meta["val"])
        return PartitionedBlock(materialize_as_graph(block_forward, args), materialize_as_graph(skip_forward, args),
                                materialize_as_graph(block_backward, backward_inputs),
                                materialize_as_graph(skip_backward, backward_inputs), tuple(grads))


def _needs_grad(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes of ``gm`` whose value can carry a gradient: a parameter with ``requires_grad``, or a floating value
    computed from one."""
    params = {name for name, p in gm.named_parameters() if p.requires_grad}
    needs = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target in params:
                needs.add(node)
        elif node.op != "placeholder" and any(a in needs for a in node.all_input_nodes):
            values = node.meta.get("val")
            values = values if isinstance(values, (tuple, list)) else [values]
            if any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in values):
                needs.add(node)
    return needs


def keep_activations(gm: fx.GraphModule) -> list[str]:
    """Rewrite each ``torch.cond(skip, identity, block, operands)`` of ``gm`` as the partitioned guarded block
    (module docstring), in place. Returns a note per block left as it was."""
    needs = _needs_grad(gm)
    notes = []
    for node in list(gm.graph.find_nodes(op="call_function", target=_cond)):
        skip, _, block, operands = node.args
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem:
            notes.append(f"{block.target}: keeps torch.cond (its result is not read as one output)")
            continue
        result = users[0]
        try:
            part = partition_block(getattr(gm, block.target), [o.meta["val"] for o in operands],
                                   [o in needs for o in operands])
        except Exception as exc:  # noqa: BLE001 - whatever fails, the block keeps its (correct, slower) torch.cond
            notes.append(f"{block.target}: keeps torch.cond ({type(exc).__name__}: {first_line(exc)})")
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(part.function(f"stsc_guarded_{block.target}"), (skip, *operands))
        call.meta["val"] = result.meta["val"]
        if result in needs:
            needs.add(call)  # the next block's hidden input
        result.replace_all_uses_with(call)
        branches = node.args[1:3]
        gm.graph.erase_node(result)
        gm.graph.erase_node(node)
        for branch in branches:
            if not branch.users:
                gm.graph.erase_node(branch)
    gm.recompile()
    return notes
