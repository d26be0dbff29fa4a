"""No internal exception escapes stsc: for a model that runs forward and backward, inspect, sparsify, transform and
profile (and the CLI) raise CaptureError, UnsupportedModelError, PolicyError or ModelFileError, naming what was
looked for, with the original exception chained; bad policies and bad arguments keep their own errors."""

import itertools
import sys
from pathlib import Path

import pytest

import hf_models
import stsc
import tiny_llava
from stsc import CaptureError, GraphLoweringUnavailable, ModelFileError, PolicyError, UnsupportedModelError, cli
from stsc.capture import capture

STSC_ERRORS = (CaptureError, UnsupportedModelError, PolicyError, ModelFileError)
MATCH, REPORT, CAPTURE = sys.modules["stsc.match"], sys.modules["stsc.report"], sys.modules["stsc.capture"]
COMPRESS, GRAPH = sys.modules["stsc.passes.compress_visual_tokens"], sys.modules["stsc.lowering.graph"]
TINY = Path(tiny_llava.__file__)

# a matcher internal made to fail -> how the error says what was looked for
INTERNALS = {
    "_token_input": "match: looking for the token input (an integer model input that indexes an embedding lookup)",
    "_stacks": "match: looking for the decoder blocks (sibling modules that run one after another on the token stream",
    "_boundary": "match: looking for the vision boundary (where values computed from the pixel inputs meet the token "
                 "stream)",
    "position_program": "match: looking for the visual positions of the merged sequence",
    "images_in": "match: looking for the images of the example inputs at those positions",
}
FAILURES = (IndexError("list index out of range"), ValueError("max() arg is an empty sequence"), KeyError("g0:add"))
CALLS = {
    "inspect": lambda model, inputs: stsc.inspect(model, inputs),
    "sparsify": lambda model, inputs: stsc.sparsify(model, "sts", inputs),
    "transform": lambda model, inputs: stsc.transform(model, "sts", inputs),
    "profile": lambda model, inputs: stsc.profile(model, [inputs], methods=["uniform"], keep_ratios=[0.5], samples=1),
}


def failing(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def raised(call, *args):
    """The stsc error ``call(*args)`` raises (None when it returns); any other exception fails the test."""
    try:
        call(*args)
    except STSC_ERRORS as error:
        return error
    return None


DEFAULT_RUN = ("llava", "molmo2")  # the other families run with the slow tests


@pytest.mark.parametrize("family", [family if family in DEFAULT_RUN else pytest.param(family, marks=pytest.mark.slow)
                                    for family in hf_models.BUILDERS])
def test_a_failing_matcher_internal_becomes_an_stsc_error_naming_what_was_looked_for(family, monkeypatch):
    model, inputs = hf_models.BUILDERS[family]()
    captured = capture(model, inputs)
    monkeypatch.setattr(REPORT, "capture", lambda *args: captured)  # captured once: each call below matches anew
    reached = set()
    for (internal, looked_for), exc in zip(INTERNALS.items(), itertools.cycle(FAILURES)):
        with monkeypatch.context() as patch:
            patch.setattr(MATCH, internal, failing(exc))
            if raised(CALLS["inspect"], model, inputs) is None:
                continue  # the model's structure does not reach this step (visual positions of a cross-attention)
            reached.add(internal)
            for name, call in CALLS.items():
                error = raised(call, model, inputs)
                assert type(error) is UnsupportedModelError, (internal, name)
                assert str(error).startswith(looked_for), (internal, name, str(error))
                assert str(error).endswith(f": {type(exc).__name__}: {exc}") and error.__cause__ is exc
    # positions are looked for at a scatter or an "other" merge, images only where positions are found (the "other"
    # merge built here, voxtral_realtime's, adds features onto every position: none are)
    reachable = {"scatter": set(INTERNALS), "other": set(INTERNALS) - {"images_in"}}
    assert reached == reachable.get(model.stsc_expected.boundary_kind, {"_token_input", "_stacks", "_boundary"})


def test_a_pass_that_fails_to_install_names_the_stage_and_the_pass(tiny, monkeypatch):
    model, inputs = tiny
    exc = KeyError("decoder")
    monkeypatch.setattr(COMPRESS, "_hidden_path", failing(exc))
    with pytest.raises(UnsupportedModelError) as info:
        stsc.sparsify(model, "sts", inputs)
    assert str(info.value) == "stage 'alignment', pass compress_visual_tokens: KeyError: 'decoder'"
    assert info.value.__cause__ is exc
    assert not model._forward_pre_hooks and not model.decoder._forward_pre_hooks  # nothing left installed
    with pytest.raises(UnsupportedModelError, match="^profile: measuring the model's token and layer redundancy on "
                                                    "the batches: KeyError: 'decoder'$"):
        stsc.profile(model, [inputs], methods=["uniform"], keep_ratios=[0.5], samples=1)


def test_a_failing_graph_rewrite_is_a_graph_lowering_error(tiny, monkeypatch):
    model, inputs = tiny
    monkeypatch.setattr(GRAPH, "_rewrite_stage", failing(IndexError("tuple index out of range")))
    with pytest.raises(GraphLoweringUnavailable) as info:
        stsc.transform(model, "sts", inputs, stage="alignment")
    assert str(info.value) == ("stage 'alignment': lowering its passes to a rewritten graph: IndexError: tuple index "
                               "out of range")
    assert isinstance(info.value, UnsupportedModelError) and isinstance(info.value.__cause__, IndexError)


def test_a_failure_while_building_the_data_flow_is_a_capture_error(tiny, monkeypatch):
    model, inputs = tiny
    monkeypatch.setattr(CAPTURE, "exported_capture", failing(AttributeError("'NoneType' object has no attribute 'op'")))
    with pytest.raises(CaptureError, match=r"^capture: a graph of the model's forward on the example inputs: "
                                           r"AttributeError: 'NoneType' object has no attribute 'op'$"):
        stsc.inspect(model, inputs)


@pytest.mark.parametrize("command", [["inspect"], ["transform", "sts"], ["profile", "--methods", "uniform"]])
def test_cli_commands_exit_3_with_what_was_looked_for(command, monkeypatch, capsys):
    monkeypatch.setattr(MATCH, "_boundary", failing(ValueError("max() arg is an empty sequence")))
    assert cli.main([command[0], str(TINY), *command[1:]]) == cli.EXIT_UNSUPPORTED
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stsc: error: {TINY}: model not supported: {INTERNALS['_boundary']}: ValueError: max() arg is an empty "
        f"sequence")


def test_bad_policies_and_arguments_keep_their_own_errors(tiny):
    model, inputs = tiny
    with pytest.raises(PolicyError):
        stsc.sparsify(model, "no_such_preset", inputs)
    with pytest.raises(ValueError, match="^profile needs at least one batch$") as info:
        stsc.profile(model, [])
    assert not isinstance(info.value, UnsupportedModelError)
