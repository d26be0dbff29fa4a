"""Visual positions: which positions of the merged sequence hold visual tokens, for any batch.

A merge that writes visual features into the token sequence (``masked_scatter``, ``index_put``,
``where``...) selects the positions with a boolean mask the model computes from its inputs: the token
ids equal to an image token, several token ids or'ed together, a mask input of its own. The matcher slices that
computation out of the captured graph(s): from the merge's mask operand back to the last node shaped
like the token ids (``[batch, seq]``), and from there back to the model inputs. The slice becomes a
small :class:`fx.GraphModule` (a :class:`PositionProgram`) that runs on any batch's inputs, on their device, so no
placeholder id, input name or family rule is written anywhere. A ``cat`` merge needs no program: the
visual tokens occupy a fixed range of slots (:class:`Slots`).
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx, nn

__all__ = ["PositionProgram", "Slots", "position_program", "slots"]


class PositionProgram:
    """``program(inputs) -> bool [batch, seq]``: the visual positions, computed from the model's inputs."""

    def __init__(self, module: fx.GraphModule, inputs: tuple[str, ...], source: str):
        self.module = module
        self.inputs = inputs  # the model inputs it reads, by keyword
        self.source = source  # data-flow key of the mask node it was sliced from

    def __call__(self, inputs: dict) -> torch.Tensor:
        missing = [name for name in self.inputs if not isinstance(inputs.get(name), torch.Tensor)]
        if missing:
            raise ValueError(f"the visual positions are computed from the model inputs {', '.join(self.inputs)}; "
                             f"this call lacks {', '.join(missing)} as keyword tensor arguments")
        values = [inputs[name] for name in self.inputs]
        with torch.device(values[0].device):  # what the program makes from no tensor is made beside its inputs
            return self.module(*values).bool()

    @property
    def code(self) -> str:
        """The program as one readable line, e.g. ``eq(<token input>, 3)``."""
        return _expression(self.module.graph)

    def __repr__(self) -> str:
        return f"PositionProgram({self.code})"


class Slots:
    """A ``cat`` merge: the visual tokens are slots ``[offset, offset + count)`` of every row."""

    def __init__(self, offset: int, count: int):
        self.offset, self.count = offset, count

    def mask(self, batch: int, sequence: int, device=None) -> torch.Tensor:
        mask = torch.zeros(batch, sequence, dtype=torch.bool, device=device)
        mask[:, self.offset:self.offset + self.count] = True
        return mask

    def __repr__(self) -> str:
        return f"Slots(positions {self.offset} to {self.offset + self.count - 1} of each row)"


def position_program(flow: nx.DiGraph, merge: str, token_shape: tuple) -> tuple[PositionProgram | None, str]:
    """Slice the computation of ``merge``'s position mask out of the data flow; ``(program, why not)``."""
    end = _mask_node(flow, merge, token_shape)
    if end is None:
        return None, (f"the merge's mask is not derived from a [batch, seq] boolean tensor shaped like the token "
                      f"input {list(token_shape)}")
    keys = sorted(nx.ancestors(flow, end) | {end}, key=lambda k: flow.nodes[k]["order"])
    graph, env, inputs, root = fx.Graph(), {}, [], nn.Module()
    for key in keys:
        data = flow.nodes[key]
        node = data["fx"]
        if data["op"] == "input":
            if data["source"] not in inputs:
                inputs.append(data["source"])
                env[data["source"]] = graph.placeholder(data["source"])
            env[key] = env[data["source"]]
        elif data["op"] == "graph_input":
            producers = list(flow.predecessors(key))
            if len(producers) != 1:
                return None, "the mask is computed from a value that crosses a graph break untraced"
            env[key] = env[producers[0]]
        elif data["op"] in ("param", "buffer", "constant") or node.op == "get_attr":
            value = data["value"] if node.op == "placeholder" else _attribute(node)
            if not isinstance(value, torch.Tensor):
                return None, f"the mask reads {data['source'] or node.target}, whose value was not captured"
            name = f"_value{len(root._buffers)}"
            root.register_buffer(name, value, persistent=False)
            env[key] = graph.get_attr(name)
        elif node.op in ("call_function", "call_method"):
            prefix = key.split(":", 1)[0]
            env[key] = graph.node_copy(node, lambda arg: env[f"{prefix}:{arg.name}"])
            env[key].kwargs = {k: v for k, v in env[key].kwargs.items() if k != "device"}  # the capture's device
            # (the meta device, for a model captured from its weights' shapes): the program runs where its inputs are
        else:
            return None, f"the mask's computation contains a {node.op} node ({node.name}) that cannot be replayed"
    graph.output(env[end])
    return PositionProgram(fx.GraphModule(root, graph), tuple(inputs), end), ""


def slots(flow: nx.DiGraph, merge: str, operand: str) -> Slots | None:
    """The slots a ``cat`` merge gives its pixel-derived ``operand`` (None unless sizes are static)."""
    node = flow.nodes[merge]["fx"]
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    prefix = merge.split(":", 1)[0]
    keys = [f"{prefix}:{t.name}" for t in tensors if isinstance(t, fx.Node)]
    offset = 0
    for key in keys:
        shape = flow.nodes[key]["shape"] or ()
        size = shape[dim] if -len(shape) <= dim < len(shape) else None
        if not isinstance(size, int):
            return None
        if key == operand:
            return Slots(offset, size)
        offset += size
    return None


def _mask_node(flow: nx.DiGraph, merge: str, token_shape: tuple) -> str | None:
    """The last boolean ``[batch, seq]`` node on the merge's non-float operands (the position mask)."""
    frontier = [p for p in flow.predecessors(merge) if not _is_float(flow, p)]
    seen = set()
    while frontier:
        key = max(frontier, key=lambda k: flow.nodes[k]["order"])
        frontier.remove(key)
        if key in seen:
            continue
        seen.add(key)
        data = flow.nodes[key]
        if data["dtype"] is torch.bool and tuple(data["shape"] or ()) == tuple(token_shape):
            return key
        frontier.extend(p for p in flow.predecessors(key)
                        if not _is_float(flow, p) and flow.nodes[p]["op"] not in ("param", "buffer"))
    return None


def _is_float(flow: nx.DiGraph, key: str) -> bool:
    dtype = flow.nodes[key]["dtype"]
    return dtype is not None and dtype.is_floating_point


def _attribute(node: fx.Node):
    value = node.graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


def _expression(graph: fx.Graph) -> str:
    """A graph of one output as a nested call expression: ``eq(<token input>, 3)``."""
    text: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            text[node] = node.target
        elif node.op == "get_attr":
            text[node] = "<tensor>"
        elif node.op in ("call_function", "call_method"):
            name = node.target if node.op == "call_method" else getattr(
                getattr(node.target, "overloadpacket", None), "__name__", getattr(node.target, "__name__", str(node.target)))
            args = [text.get(a, repr(a)) if isinstance(a, fx.Node) else repr(a) for a in node.args]
            args += [f"{k}={text.get(v, repr(v)) if isinstance(v, fx.Node) else repr(v)}" for k, v in node.kwargs.items()]
            text[node] = f"{name}({', '.join(args)})"
        elif node.op == "output":
            return text[node.args[0]]
    return ""
