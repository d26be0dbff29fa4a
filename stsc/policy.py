"""Stage policy: which pass runs in which training stage, with which parameters, read from YAML.

Schema (``version: 1``)::

    version: 1                 # required
    seed: 0                    # optional (default 0): seed of every pass that draws at random,
                               #   unless the pass sets its own `seed`
    stages:                    # required, a non-empty list, in training order
      - name: alignment        # required, unique; letters, digits, '_' and '-'
        epochs: 1              # the stage's length: `epochs` (a number > 0) or `steps` (an integer > 0),
                               #   exactly one, and the same unit in every stage
        start: 0               # optional, in that unit; default: where the previous stage ends
        passes:                # required: pass name -> parameters; `{}` is a dense stage
          compress_visual_tokens: {method: uniform, keep_ratio: 0.5}

A pass's parameters are the fields of its config dataclass (``stsc.registry.get_pass(name).config_cls``),
type-checked here and range-checked by the dataclass. Two are owned by the policy, not the pass:
``epochs`` (a pass's schedule length, always the stage's length) and the default ``seed``.

Parsing uses ``yaml.SafeLoader`` (what ``yaml.safe_load`` uses: no Python object tags), extended
only to remember line numbers and to refuse duplicate keys. Every problem is a :class:`PolicyError`
reading ``file:line: where: what is wrong; what is allowed``. A loaded :class:`Policy` is frozen:
what is applied is what was written (``Policy.to_dict()`` round-trips).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import PolicyError
from .registry import available_passes, get_pass

__all__ = ["PassEntry", "Policy", "PolicyError", "Stage", "load_policy", "parse_policy", "preset_path"]

VERSION = 1
POLICY_OWNED = ("epochs",)  # pass-config fields the stage sets
_TOP_KEYS = ("version", "seed", "stages")
_STAGE_KEYS = ("name", "epochs", "steps", "start", "passes")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class PassEntry:
    name: str
    config: Any  # the pass's frozen config dataclass
    params: tuple[tuple[str, Any], ...]  # the parameters as written (for to_dict and reports)


@dataclass(frozen=True)
class Stage:
    name: str
    unit: str  # "epochs" or "steps"
    length: float  # E, in `unit`
    start: float  # in `unit`, from the start of training
    passes: tuple[PassEntry, ...]

    @property
    def end(self) -> float:
        return self.start + self.length

    def pass_config(self, name: str):
        return next((entry.config for entry in self.passes if entry.name == name), None)


@dataclass(frozen=True)
class Policy:
    version: int
    seed: int
    stages: tuple[Stage, ...]
    source: str = "<policy>"

    @property
    def unit(self) -> str:
        return self.stages[0].unit

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PolicyError(f"{self.source}: no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def stage_at(self, progress: float) -> Stage | None:
        """The stage active at ``progress`` (in the policy's unit), or None between or after stages."""
        return next((s for s in self.stages if s.start <= progress < s.end), None)

    def to_dict(self) -> dict:
        return {"version": self.version, "seed": self.seed, "stages": [
            {"name": s.name, s.unit: _plain(s.length), "start": _plain(s.start),
             "passes": {entry.name: dict(entry.params) for entry in s.passes}} for s in self.stages]}


def _plain(number: float):
    return int(number) if float(number).is_integer() else number


def preset_path(name: str) -> Path:
    """Path of a shipped preset (``"sts"`` -> ``policies/sts.yaml``)."""
    path = Path(str(resources.files("stsc.policies") / f"{name}.yaml"))
    if not path.is_file():
        shipped = sorted(p.name[:-5] for p in resources.files("stsc.policies").iterdir() if p.name.endswith(".yaml"))
        raise PolicyError(f"{name}: no such policy file or preset; presets: {', '.join(shipped)}")
    return path


def load_policy(policy: Policy | str | Path) -> Policy:
    """A :class:`Policy` from a policy, a YAML file path, or a preset name (``"sts"``)."""
    if isinstance(policy, Policy):
        return policy
    path = Path(policy)
    if not path.is_file():
        if isinstance(policy, str) and _NAME.fullmatch(policy):
            path = preset_path(policy)
        else:
            raise PolicyError(f"{policy}: no such policy file")
    return parse_policy(path.read_text(), source=str(path))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate the YAML ``text`` of a policy; ``source`` names it in errors."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise PolicyError(f"{source}:{exc.line}: duplicate key {exc.key!r}; each key may appear once") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError(f"{source}:{line}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}:1: not valid YAML: {exc}") from None
    return _Validator(source).policy(data)


# ----------------------------------------------------------------------------------- YAML lines
class _Map(dict):
    """A YAML mapping that remembers its own line and each key's line."""

    line: int = 1
    lines: dict


class _Seq(list):
    """A YAML sequence that remembers each item's line."""

    lines: list


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line):
        super().__init__(key)
        self.key, self.line = key, line


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool, type(None))):
            key = repr(key)  # unhashable or odd keys are reported as unknown keys
        if key in out:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(item, deep=True) for item in node.value)
    out.lines = [item.start_mark.line + 1 for item in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


# ----------------------------------------------------------------------------------- validation
class _Validator:
    def __init__(self, source: str):
        self.source = source

    def fail(self, line: int, where: str, message: str):
        raise PolicyError(f"{self.source}:{line}: {where}: {message}")

    def keys(self, mapping: _Map, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()):
        for key in mapping:
            if key not in allowed:
                self.fail(mapping.lines[key], where,
                          f"unknown key {key!r}; {_suggestion(key, allowed)}allowed: {', '.join(allowed)}")
        for key in required:
            if key not in mapping:
                self.fail(mapping.line, where, f"missing key {key!r}")

    def mapping(self, value, line: int, where: str) -> _Map:
        if not isinstance(value, _Map):
            self.fail(line, where, f"expected a mapping, got {_describe(value)}")
        return value

    def policy(self, data) -> Policy:
        data = self.mapping(data, 1, "policy")
        self.keys(data, _TOP_KEYS, "policy", required=("version", "stages"))
        if data["version"] != VERSION or isinstance(data["version"], bool):
            self.fail(data.lines["version"], "version", f"expected {VERSION}, got {_describe(data['version'])}")
        seed = data.get("seed", 0)
        if type(seed) is not int or seed < 0:
            self.fail(data.lines.get("seed", data.line), "seed", f"expected an integer >= 0, got {_describe(seed)}")
        stages_line = data.lines["stages"]
        if not isinstance(data["stages"], _Seq) or not data["stages"]:
            self.fail(stages_line, "stages", f"expected a non-empty list of stages, got {_describe(data['stages'])}")
        stages: list[Stage] = []
        for index, raw in enumerate(data["stages"]):
            stages.append(self.stage(raw, index, stages, seed, data["stages"].lines[index]))
        return Policy(VERSION, seed, tuple(stages), self.source)

    def stage(self, raw, index: int, previous: list[Stage], seed: int, line: int) -> Stage:
        where = f"stages[{index}]"
        raw = self.mapping(raw, line, where)
        self.keys(raw, _STAGE_KEYS, where, required=("name", "passes"))
        name = raw["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            self.fail(raw.lines["name"], f"{where}.name", f"expected a name of letters, digits, '_' or '-', "
                                                          f"got {_describe(name)}")
        if any(s.name == name for s in previous):
            self.fail(raw.lines["name"], f"{where}.name", f"stage name {name!r} is used twice; names must be unique")
        where = f"stage {name!r}"
        units = [unit for unit in ("epochs", "steps") if unit in raw]
        if len(units) != 1:
            self.fail(raw.line, where, "give its length as exactly one of 'epochs' (a number > 0) or 'steps' "
                                       f"(an integer > 0), got {' and '.join(units) or 'neither'}")
        unit = units[0]
        length = self.number(raw, unit, where, integer=unit == "steps", positive=True)
        if previous and previous[0].unit != unit:
            self.fail(raw.lines[unit], f"{where}.{unit}", f"every stage must count in the same unit; stage "
                                                          f"{previous[0].name!r} counts in {previous[0].unit}")
        start = previous[-1].end if previous else 0.0
        if "start" in raw:
            start = self.number(raw, "start", where, integer=unit == "steps", positive=False)
        if previous and start < previous[-1].end:
            self.fail(raw.lines.get("start", raw.line), f"{where}.start",
                      f"starts at {unit} {_plain(start)}, before stage {previous[-1].name!r} ends at "
                      f"{_plain(previous[-1].end)}; stages may not overlap")
        passes = raw["passes"]
        if passes is None:
            self.fail(raw.lines["passes"], f"{where}.passes", "empty; name the passes of the stage, or write "
                                                              "`passes: {}` for a dense stage")
        passes = self.mapping(passes, raw.lines["passes"], f"{where}.passes")
        entries = tuple(self.pass_entry(passes, key, where, length, seed) for key in passes)
        return Stage(name, unit, float(length), float(start), entries)

    def number(self, mapping: _Map, key: str, where: str, *, integer: bool, positive: bool) -> float:
        value = mapping[key]
        kind = "an integer" if integer else "a number"
        bound = "> 0" if positive else ">= 0"
        ok = (type(value) is int or (not integer and type(value) is float)) and (value > 0 if positive else value >= 0)
        if not ok or value != value or value == float("inf"):
            self.fail(mapping.lines[key], f"{where}.{key}", f"expected {kind} {bound}, got {_describe(value)}")
        return value

    def pass_entry(self, passes: _Map, name, where: str, length: float, seed: int) -> PassEntry:
        line, where = passes.lines[name], f"{where}.passes.{name}"
        known = available_passes()
        if name not in known:
            self.fail(line, where, f"unknown pass {name!r}; {_suggestion(name, known)}passes: {', '.join(known)}")
        params = passes[name]
        if params is None:
            params = _Map()
            params.line, params.lines = line, {}
        params = self.mapping(params, line, where)
        spec = get_pass(name)
        hints = typing.get_type_hints(spec.config_cls)
        settable = tuple(f.name for f in dataclasses.fields(spec.config_cls) if f.name not in POLICY_OWNED)
        for key in params:
            if key in POLICY_OWNED:
                self.fail(params.lines[key], f"{where}.{key}", "set by the stage's length ('epochs' or 'steps'); "
                                                              "remove it here")
        self.keys(params, settable, where)
        values = {key: self.typed(params[key], hints[key], params.lines[key], f"{where}.{key}") for key in params}
        if "epochs" in hints:
            values["epochs"] = float(length)
        if "seed" in hints and "seed" not in values:
            values["seed"] = seed
        try:
            config = spec.config_cls(**values)
        except ValueError as exc:
            field = next((key for key in params if str(exc).startswith(key) or f" {key}" in str(exc)), None)
            self.fail(params.lines.get(field, params.line), where, str(exc))
        return PassEntry(name, config, tuple((key, _as_written(params[key])) for key in params))

    def typed(self, value, hint, line: int, where: str):
        """``value`` checked against a config field's type hint (bool, int, float, str, tuple[int, ...], X | None)."""
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is bool and type(value) is bool:
                return value
            if option is int and type(value) is int:
                return value
            if option is float and type(value) in (int, float):
                return float(value)
            if option is str and type(value) is str:
                return value
            if typing.get_origin(option) is tuple and isinstance(value, _Seq) and all(type(v) is int for v in value):
                return tuple(value)
        self.fail(line, where, f"expected {_type_name(options)}, got {_describe(value)}")


def _suggestion(name, allowed) -> str:
    """``"did you mean 'x'? "`` for the closest allowed name, or nothing."""
    near = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
    return f"did you mean {near[0]!r}? " if near else ""


def _as_written(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _type_name(options) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names.get(o, "a list of integers" if typing.get_origin(o) is tuple else str(o)) for o in options)


def _describe(value) -> str:
    if isinstance(value, _Map):
        return "a mapping"
    if isinstance(value, _Seq):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{value!r} ({type(value).__name__})"
