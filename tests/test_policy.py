"""The stage policy: loading, validation messages (file:line), presets, and a fuzz of malformed policies."""

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stsc.passes.compress_visual_tokens import CompressVisualTokensConfig
from stsc.passes.skip_layers import SkipLayersConfig
from stsc.policy import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]

VALID = """\
version: 1
seed: 7
stages:
  - name: alignment
    epochs: 1
    passes:
      compress_visual_tokens: {method: uniform, keep_ratio: 0.5}
  - name: instruction
    epochs: 2
    passes:
      skip_layers: {schedule: sts, alpha: 0.5, eps: 1.0, skip_kinds: [0]}
"""


def test_valid_policy_loads_into_frozen_configs():
    policy = parse_policy(VALID, "p.yaml")
    alignment, instruction = policy.stages
    assert (alignment.name, alignment.start, alignment.end) == ("alignment", 0.0, 1.0)
    assert (instruction.start, instruction.end, instruction.unit) == (1.0, 3.0, "epochs")
    assert alignment.pass_config("compress_visual_tokens") == CompressVisualTokensConfig("uniform", 0.5, seed=7)
    assert instruction.pass_config("skip_layers") == SkipLayersConfig(alpha=0.5, eps=1.0, epochs=2.0, skip_kinds=(0,),
                                                                      seed=7)
    assert policy.stage_at(0.5) is alignment and policy.stage_at(2.9) is instruction and policy.stage_at(3) is None
    assert parse_policy(yaml.safe_dump(policy.to_dict(), sort_keys=False), "again.yaml").stages == policy.stages


@pytest.mark.parametrize("preset", ["sts", "vtc", "lds", "dense"])
def test_presets_load_by_name_and_path(preset):
    by_name = load_policy(preset)
    assert by_name.stages == load_policy(ROOT / "policies" / f"{preset}.yaml").stages
    assert [s.name for s in by_name.stages] == ["alignment", "instruction"]


def test_sts_preset_is_the_papers_two_stage_scheme():
    policy = load_policy("sts")
    assert [e.name for e in policy.stage("alignment").passes] == ["compress_visual_tokens"]
    assert [e.name for e in policy.stage("instruction").passes] == ["skip_layers"]
    assert not any(stage.passes for stage in load_policy("dense").stages)


def test_step_counted_stages_and_explicit_starts():
    policy = parse_policy("version: 1\nstages:\n  - {name: a, steps: 100, passes: {}}\n"
                          "  - {name: b, steps: 50, start: 150, passes: {skip_layers: {}}}\n")
    assert policy.unit == "steps"
    assert policy.stage_at(120) is None and policy.stage_at(150).name == "b"
    assert policy.stage("b").pass_config("skip_layers").epochs == 50.0


def _error(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return str(info.value)


def _replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


@pytest.mark.parametrize("text, message", [
    (_replace("keep_ratio: 0.5", "keep_ration: 0.5"),
     "p.yaml:7: stage 'alignment'.passes.compress_visual_tokens: unknown key 'keep_ration'; did you mean "
     "'keep_ratio'? allowed: method, keep_ratio, kernel, seed, dense_fraction"),
    (_replace("keep_ratio: 0.5", "keep_ratio: 1.5"),
     "p.yaml:7: stage 'alignment'.passes.compress_visual_tokens: keep_ratio must be in (0, 1], got 1.5"),
    (_replace("keep_ratio: 0.5", "keep_ratio: half"),
     "p.yaml:7: stage 'alignment'.passes.compress_visual_tokens.keep_ratio: expected a number, got 'half' (str)"),
    (_replace("alpha: 0.5", "alpha: 0.8"),
     "p.yaml:11: stage 'instruction'.passes.skip_layers: alpha * (1 + eps) must be in [0, 1] so that every skip "
     "probability is valid, got alpha=0.8, eps=1.0 (1.6)"),
    (_replace("skip_layers:", "skip_layer:"),
     "p.yaml:11: stage 'instruction'.passes.skip_layer: unknown pass 'skip_layer'; did you mean 'skip_layers'? "
     "passes: compress_visual_tokens, skip_layers"),
    (_replace("    epochs: 2\n", "    epoch: 2\n"),
     "p.yaml:9: stages[1]: unknown key 'epoch'; did you mean 'epochs'? allowed: name, epochs, steps, start, passes"),
    (_replace("    epochs: 2\n", "    epochs: 2\n    steps: 10\n"),
     "p.yaml:8: stage 'instruction': give its length as exactly one of 'epochs' (a number > 0) or 'steps' "
     "(an integer > 0), got epochs and steps"),
    (_replace("    epochs: 2\n", "    epochs: 0\n"),
     "p.yaml:9: stage 'instruction'.epochs: expected a number > 0, got 0 (int)"),
    (_replace("    epochs: 2\n", "    epochs: 2\n    start: 0.5\n"),
     "p.yaml:10: stage 'instruction'.start: starts at epochs 0.5, before stage 'alignment' ends at 1; stages may "
     "not overlap"),
    (_replace("name: instruction", "name: alignment"),
     "p.yaml:8: stages[1].name: stage name 'alignment' is used twice; names must be unique"),
    (_replace("      skip_layers: {schedule: sts, alpha: 0.5, eps: 1.0, skip_kinds: [0]}\n", ""),
     "p.yaml:10: stage 'instruction'.passes: empty; name the passes of the stage, or write `passes: {}` for a "
     "dense stage"),
    (_replace("alpha: 0.5,", "alpha: 0.5, epochs: 3,"),
     "p.yaml:11: stage 'instruction'.passes.skip_layers.epochs: set by the stage's length ('epochs' or 'steps'); "
     "remove it here"),
    (_replace("version: 1", "version: 2"), "p.yaml:1: version: expected 1, got 2 (int)"),
    (_replace("seed: 7", "seed: 7\nseed: 8"), "p.yaml:3: duplicate key 'seed'; each key may appear once"),
    (_replace("seed: 7", "sed: 7"), "p.yaml:2: policy: unknown key 'sed'; did you mean 'seed'? allowed: version, "
                                    "seed, stages"),
    ("version: 1\nstages: []\n", "p.yaml:2: stages: expected a non-empty list of stages, got a list"),
    ("- 1\n- 2\n", "p.yaml:1: policy: expected a mapping, got a list"),
    ("version: 1\nstages: [\n", "p.yaml:3: not valid YAML: expected the node content, but found '<stream end>'"),
    ("version: 1\nstages:\n  - !!python/object/apply:os.system [echo hi]\n",
     "p.yaml:3: not valid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
])
def test_bad_policy_message(text, message):
    assert _error(text) == message


def test_unknown_file_and_preset():
    with pytest.raises(PolicyError, match=r"^nope: no such policy file or preset; presets: dense, lds, sts, sts_fast, vtc$"):
        load_policy("nope")
    with pytest.raises(PolicyError, match=r"^/no/such\.yaml: no such policy file$"):
        load_policy("/no/such.yaml")


# ------------------------------------------------------------------------------------ fuzzing
PASS_PARAMS = {
    "compress_visual_tokens": {"method": st.sampled_from(["uniform", "random", "text_guided", "pool", "merge"]),
                               "keep_ratio": st.floats(0.05, 1.0), "kernel": st.integers(1, 4)},
    "skip_layers": {"schedule": st.sampled_from(["sts", "linear", "constant"]), "alpha": st.floats(0, 0.5),
                    "eps": st.floats(0, 1), "never_skip_first": st.integers(0, 2), "min_kept": st.integers(1, 3)},
}


@st.composite
def valid_policies(draw):
    stages = []
    for index in range(draw(st.integers(1, 3))):
        passes = {}
        for name in draw(st.lists(st.sampled_from(sorted(PASS_PARAMS)), unique=True, max_size=2)):
            keys = draw(st.lists(st.sampled_from(sorted(PASS_PARAMS[name])), unique=True))
            passes[name] = {key: draw(PASS_PARAMS[name][key]) for key in keys}
        stages.append({"name": f"stage{index}", "epochs": draw(st.sampled_from([1, 2, 0.5])), "passes": passes})
    return {"version": 1, "seed": draw(st.integers(0, 10)), "stages": stages}


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def malformed_policies(draw):
    """A valid policy with one change that makes it invalid."""
    policy = draw(valid_policies())
    stage = draw(st.sampled_from(policy["stages"]))
    kind = draw(st.sampled_from(["top_key", "version", "seed", "stages", "stage_key", "name", "length", "unit",
                                 "passes", "pass_name", "param_key", "param_value", "overlap", "duplicate_name",
                                 "not_mapping"]))
    if kind == "top_key":
        policy[draw(st.sampled_from(["verison", "stage", "passes", "x"]))] = draw(JUNK)
    elif kind == "version":
        policy["version"] = draw(JUNK.filter(lambda v: v != 1 or isinstance(v, bool)))
    elif kind == "seed":
        policy["seed"] = draw(JUNK.filter(lambda v: not (type(v) is int and v >= 0)))
    elif kind == "stages":
        policy["stages"] = draw(st.one_of(st.just([]), JUNK.filter(lambda v: not isinstance(v, list) or not v)))
    elif kind == "stage_key":
        stage[draw(st.sampled_from(["nam", "epoch", "pass", "until"]))] = draw(JUNK)
    elif kind == "name":
        stage["name"] = draw(st.one_of(st.sampled_from(["", "a b", "x/y"]), JUNK.filter(lambda v: not isinstance(v, str))))
    elif kind == "length":
        stage["epochs"] = draw(st.one_of(st.floats(max_value=0), st.sampled_from([float("nan"), float("inf")]),
                                         JUNK.filter(lambda v: type(v) not in (int, float) or not v > 0)))
    elif kind == "unit":
        if draw(st.booleans()):
            stage["steps"] = 10
        else:
            del stage["epochs"]
    elif kind == "passes":
        stage["passes"] = draw(st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.integers()))
    elif kind == "pass_name":
        stage["passes"][draw(st.sampled_from(["skip", "compress", "Skip_Layers", "lora"]))] = {}
    elif kind == "param_key":
        name = draw(st.sampled_from(sorted(PASS_PARAMS)))
        stage["passes"].setdefault(name, {})[draw(st.sampled_from(["ratio", "alpa", "epochs", "layers"]))] = 1
    elif kind == "param_value":
        name = draw(st.sampled_from(sorted(PASS_PARAMS)))
        key, value = draw(st.sampled_from([("keep_ratio", 0), ("keep_ratio", 1.5), ("keep_ratio", "x"), ("kernel", 0),
                                           ("method", "best"), ("method", 3), ("alpha", 0.9), ("eps", -1),
                                           ("schedule", "cosine"), ("min_kept", 0), ("skip_kinds", "0"),
                                           ("seed", 1.5), ("alpha", True), ("kernel", 2.0)]))
        if key in ("keep_ratio", "kernel", "method") and name != "compress_visual_tokens":
            name = "compress_visual_tokens"
        elif key not in ("keep_ratio", "kernel", "method", "seed") and name != "skip_layers":
            name = "skip_layers"
        if key == "alpha" and value == 0.9:
            stage["passes"].setdefault(name, {})["eps"] = 0.5
        stage["passes"].setdefault(name, {})[key] = value
    elif kind == "overlap":
        if len(policy["stages"]) < 2:
            policy["stages"].append({"name": "extra", "epochs": 1, "passes": {}})
        policy["stages"][-1]["start"] = -0.5 if draw(st.booleans()) else 0
    elif kind == "duplicate_name":
        policy["stages"].append(dict(policy["stages"][0]))
    elif kind == "not_mapping":
        index = policy["stages"].index(stage)
        policy["stages"][index] = draw(st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)))
    return yaml.safe_dump(policy, sort_keys=False)


LOCATED = re.compile(r"^fuzz\.yaml:\d+: \S")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_policies())
def test_fuzz_every_malformed_policy_gives_a_located_policy_error(text):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "fuzz.yaml")
    assert LOCATED.match(str(info.value)), str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("version: 1\nstages-[]{},'\"!&*#?|>%@`x0.5")), max_size=80))
def test_fuzz_arbitrary_text_never_escapes_as_another_exception(text):
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as exc:
        assert LOCATED.match(str(exc)), str(exc)


@settings(max_examples=200, deadline=None)
@given(valid_policies())
def test_fuzz_valid_policies_round_trip(policy):
    loaded = parse_policy(yaml.safe_dump(policy, sort_keys=False), "fuzz.yaml")
    assert parse_policy(yaml.safe_dump(loaded.to_dict(), sort_keys=False), "again.yaml").stages == loaded.stages
