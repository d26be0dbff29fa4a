"""The graph lowering: an exported graph rewritten by the passes (a compression op, torch.cond skip branches),
equal to the module lowering, compiled once for every skip pattern, saved and loaded."""

import collections
import copy
import inspect
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

import hf_models
import tiny_llava
from stsc import GraphLoweringUnavailable, backend, sparsify, transform
from stsc.lowering import saved_activations
from stsc.policy import parse_policy

ROOT = Path(__file__).resolve().parents[1]


def build(family):
    if family == "tiny":
        model = tiny_llava.build_model()
        return model, tiny_llava.example_inputs(model)
    return hf_models.BUILDERS[family]()


@cache
def lowered(family):
    """The family's model, inputs and the graph lowering of every stage of ``sts`` (built once per family)."""
    model, inputs = build(family)
    return model, inputs, transform(model, "sts", inputs)


def loss_of(output):
    return output["loss"] if isinstance(output, dict) else output.loss


def grads(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def partitioned_blocks(training_module):
    """The partitioned guarded blocks (:class:`stsc.lowering.saved_activations.PartitionedBlock`) a training graph
    calls, in order."""
    return [node.target.block for node in training_module.graph.nodes if hasattr(node.target, "block")]


def test_the_graph_shows_the_inserted_nodes_by_name():
    _, _, stages = lowered("tiny")
    alignment, instruction = stages["alignment"].graph_module.code, stages["instruction"].graph_module.code
    assert "torch.ops.stsc.compress_plan.default" in alignment and "torch.ops.stsc.compact.default" in alignment
    assert "torch.ops.stsc.expand.default" in alignment and "torch.ops.higher_order.cond" not in alignment
    assert instruction.count("torch.ops.higher_order.cond") == 4
    assert [r.summary() for r in stages["alignment"].rewrites] == [
        "compress_visual_tokens: +8 nodes (1 stsc_step, 1 compress_plan_default, 2 getitem, 1 sym_size_int, "
        "2 compact_default, 1 expand_default), -0 nodes, 24 uses redirected"]


def test_the_graph_module_trains_the_callers_parameters():
    model, _, stages = lowered("tiny")
    named = dict(model.named_parameters())
    for stage in stages.values():
        assert all(p is named[name.removeprefix("inner.")] for name, p in stage.graph_module.named_parameters())


@pytest.mark.parametrize("family", ["tiny", *(pytest.param(f, marks=pytest.mark.slow)
                                              for f in ("llava", "paligemma", "idefics3", "gemma3"))])
def test_loss_and_every_gradient_equal_the_module_lowering(family):
    """Same step, same kept tokens, same skip pattern: the rewritten graph computes what the hooks compute;
    a block skipped in the step has no gradient in either (torch.cond's zeros are reset to None)."""
    model, inputs, stages = lowered(family)
    reference = copy.deepcopy(model)
    for name, step, pattern in (("alignment", 3, None), ("instruction", 5, [0, 2])):
        graph, sparse = stages[name], sparsify(reference, "sts", inputs, stage=name)
        graph.set_progress(epoch=0.1, step=step)
        sparse.set_progress(epoch=0.1, step=step)
        graph.force(pattern)
        if pattern:
            sparse.runtimes["skip_layers"].force(pattern)
        model.zero_grad(set_to_none=True)
        graph_loss, module_loss = loss_of(graph(**inputs)), loss_of(sparse(**inputs))
        graph_loss.backward()
        module_loss.backward()
        torch.testing.assert_close(graph_loss, module_loss, rtol=1e-6, atol=1e-6)
        expected = grads(reference)
        for param, (name_, grad) in zip(model.parameters(), expected.items()):
            assert (param.grad is None) == (grad is None), name_
            if grad is not None:
                torch.testing.assert_close(param.grad, grad, rtol=1e-6, atol=1e-6)
        sparse.unwrap()
        reference.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["tiny", *(pytest.param(f, marks=pytest.mark.slow)
                                              for f in ("llava", "paligemma", "idefics3", "gemma3", "lfm2_vl"))])
def test_a_stage_that_compresses_with_dense_forwards_and_skips_equals_the_module_lowering(family):
    """sts_fast's instruction stage: compaction, a third of the forwards drawn dense, skipped blocks. A forward
    drawn dense runs the graph lowered without the compression; every step's loss and gradients equal the
    module lowering's, and both lowerings draw the same forwards dense. (LFM2-VL: each image's token grid comes
    from an input, ``spatial_shapes``, which the graph's plan reads too.)"""
    model, inputs = build(family)
    reference = copy.deepcopy(model)
    graph = transform(model, "sts_fast", inputs, stage="instruction")["instruction"]
    assert graph.training_notes == []  # every guarded block of both graphs saves its activations
    dense_code = graph.exported_dense.module().code
    assert "torch.ops.stsc.compact.default" not in dense_code and "torch.ops.higher_order.cond" in dense_code
    sparse = sparsify(reference, "sts_fast", inputs, stage="instruction")
    drawn_dense = []
    for step in range(8):
        for lowering in (graph, sparse):
            lowering.set_progress(epoch=0.2, step=step)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        graph_loss, module_loss = loss_of(graph(**inputs)), loss_of(sparse(**inputs))
        graph_loss.backward()
        module_loss.backward()
        assert graph.runtime.last_dense == (not sparse.runtimes["compress_visual_tokens"].last_plan.drops)
        assert graph.last_skipped == sparse.runtimes["skip_layers"].last_skipped
        drawn_dense.append(graph.runtime.last_dense)
        torch.testing.assert_close(graph_loss, module_loss, rtol=1e-6, atol=1e-6)
        for param, expected in zip(model.parameters(), reference.parameters()):
            assert (param.grad is None) == (expected.grad is None)
            if param.grad is not None:
                torch.testing.assert_close(param.grad, expected.grad, rtol=1e-6, atol=1e-6)
    assert drawn_dense == [False, False, True, False, False, True, False, False]  # seed 0's draws


def test_a_stage_counted_in_steps_moves_its_schedule_with_the_step():
    policy = parse_policy("version: 1\nstages:\n  - {name: s, steps: 10, passes: {skip_layers: "
                          "{schedule: sts, alpha: 0.6, eps: 0.5}}}\n")
    model, inputs = build("tiny")
    graph = transform(model, policy, inputs)["s"]
    sparse = sparsify(copy.deepcopy(model), policy, inputs)
    for lowering in (graph, sparse):
        lowering.set_progress(step=4)
    assert graph.runtime.probabilities() == sparse.runtimes["skip_layers"].probabilities()
    assert graph.runtime.probabilities() == pytest.approx([0.108, 0.18, 0.252, 0.324])  # 0.6 * (6/10)^2 * (...)


@pytest.mark.slow
def test_blocks_that_cannot_run_under_torch_cond_are_refused_by_name():
    model, inputs = hf_models.aria()  # MoE decoder blocks
    with pytest.raises(GraphLoweringUnavailable, match=r"^skip_layers: model.language_model.layers.0, "
                                                       r"model.language_model.layers.1, model.language_model.layers.2 "
                                                       r"cannot run under torch.cond"):
        transform(model, "sts", inputs, stage="instruction")


@pytest.mark.slow
def test_the_forwards_drawn_dense_compile_to_a_second_graph():
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    model, inputs = build("tiny")
    graph = transform(model, "sts_fast", inputs, stage="instruction")["instruction"]
    compiled = []
    torch._dynamo.reset()
    graph.compile(backend=lambda gm, example_inputs: compiled.append(gm) or aot_eager(gm, example_inputs),
                  dynamic=False)
    kinds = set()
    for step in range(12):
        graph.set_progress(epoch=0.0, step=step)
        loss_of(graph(**inputs)).backward()
        kinds.add(graph.runtime.last_dense)
    assert kinds == {False, True} and len(compiled) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["tiny", *(pytest.param(f, marks=pytest.mark.slow)
                                              for f in ("llava", "paligemma", "idefics3", "gemma3"))])
def test_a_running_block_runs_its_forward_once_and_a_skipped_block_nothing(family):
    """torch.cond's own backward runs the taken branch's forward again; the training graph's guarded blocks
    save their activations instead: in a step, a running block's forward and backward graphs run once each,
    a skipped block's not at all."""
    model, inputs, stages = lowered(family)
    graph = stages["instruction"]
    assert graph.training_notes == []
    blocks = partitioned_blocks(graph.training_module)
    guarded = [i for i, g in enumerate(graph.runtime.guarded) if g]
    assert len(blocks) == len(guarded) == graph.graph_module.code.count("torch.ops.higher_order.cond") >= 2
    calls = collections.Counter()
    handles = [module.register_forward_pre_hook(lambda *_, key=(rank, kind): calls.update([key]))
               for rank, block in enumerate(blocks) for kind, module in (("forward", block.forward),
                                                                         ("backward", block.backward))]
    graph.set_progress(epoch=0.1, step=7)
    for skipped in ([], [1]):
        graph.force([guarded[rank] for rank in skipped])
        calls.clear()
        loss_of(graph(**inputs)).backward()
        assert calls == {(rank, kind): 1 for rank in range(len(blocks)) if rank not in skipped
                         for kind in ("forward", "backward")}
    graph.force(None)
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)


def test_a_block_whose_partition_fails_keeps_its_torch_cond_and_says_why(monkeypatch):
    graph = lowered("tiny")[2]["instruction"]

    def refuse(*args):
        raise saved_activations.NotPartitioned("refused by the test")
    monkeypatch.setattr(saved_activations, "partition_block", refuse)
    module = graph.exported.module()
    notes = saved_activations.keep_activations(module)
    assert notes == [f"false_graph_{i}: keeps torch.cond (NotPartitioned: refused by the test)" for i in range(4)]
    assert module.code.count("torch.ops.higher_order.cond") == 4 and not partitioned_blocks(module)


def test_parameters_frozen_after_the_transform_get_no_gradient():
    """The blocks' backward graphs are partitioned for the parameters that train; freezing a block's parameters
    partitions them again at the next forward, and those parameters get no gradient (not zeros)."""
    model, inputs, stages = lowered("tiny")
    graph, frozen = stages["instruction"], list(model.decoder.layers[0].parameters())
    before = graph.training_module
    for param in frozen:
        param.requires_grad_(False)
    try:
        graph.force([])
        model.zero_grad(set_to_none=True)
        loss_of(graph(**inputs)).backward()
        first, now = partitioned_blocks(before)[0], partitioned_blocks(graph.training_module)[0]
        assert sum(now.grads) == sum(first.grads) - len(frozen)  # no gradient computed for them
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in model.decoder.layers[1].parameters())
    finally:
        for param in frozen:
            param.requires_grad_(True)
        graph.force(None)
        model.zero_grad(set_to_none=True)


def test_a_block_skipped_in_one_micro_batch_and_run_in_the_next_keeps_its_gradient():
    model, inputs, stages = lowered("tiny")
    graph = stages["instruction"]
    graph.set_progress(step=11)
    model.zero_grad(set_to_none=True)
    for pattern in ([1], [2]):  # block 1 skipped then run; block 2 run then skipped
        graph.force(pattern)
        loss_of(graph(**inputs)).backward()
    layer = model.decoder.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (*layer[1].parameters(), *layer[2].parameters()))
    graph.set_progress(step=12)
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        graph.force([3])
        loss_of(graph(**inputs)).backward()
    assert all(p.grad is None for p in layer[3].parameters())  # skipped in both micro-batches: no gradient
    graph.force(None)


@pytest.mark.parametrize("stage", ["alignment", "instruction"])
def test_the_transformed_graph_trains(stage):
    model, inputs, stages = lowered("tiny")
    graph = stages[stage]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(6):
        graph.set_progress(epoch=0.0, step=100 + step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(graph(**inputs))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_sequence_length_is_dynamic_and_eval_is_the_dense_model():
    model, _, stages = lowered("tiny")
    longer = tiny_llava.example_inputs(model, text_tokens=30)
    graph = stages["alignment"]
    assert graph(**longer)["logits"].shape == (2, 1 + 64 + 30, 128)
    graph.eval()
    with torch.no_grad():
        assert torch.equal(graph(**longer)["logits"], model.eval()(**longer)["logits"])
    graph.train()


@pytest.mark.slow
def test_one_compiled_graph_serves_every_skip_pattern_and_the_compression():
    """torch.compile of each stage's graph: one graph, no recompilation over 52 random skip patterns."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    model, inputs = build("tiny")
    stages = transform(model, "sts", inputs)
    for name in ("instruction", "alignment"):
        graph, compiled = stages[name], []
        torch._dynamo.reset()
        graph.compile(backend=lambda gm, example_inputs: compiled.append(gm) or aot_eager(gm, example_inputs),
                      dynamic=False)
        patterns = set()
        for step in range(52):
            graph.set_progress(epoch=0.0, step=200 + step)
            loss_of(graph(**inputs)).backward()
            patterns.add(tuple(graph.last_skipped))
        assert len(compiled) == 1, name
        assert name == "alignment" or len(patterns) >= 8
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_model_that_does_not_export_says_so():
    model, inputs = hf_models.qwen2_vl()
    sparse = sparsify(copy.deepcopy(model), "sts", inputs)
    assert sparse.report.stages[0].lowerings["graph"].startswith("not available: the model does not export "
                                                                 "(torch.export failed: ")
    assert sparse.report.stages[0].lowerings["modules"] == "ok"
    with pytest.raises(GraphLoweringUnavailable, match=r"^the model does not export \(torch.export failed: "):
        transform(model, "sts", inputs)


@pytest.mark.parametrize("params, reason", [
    ("{method: pool}", "method 'pool' averages tokens; the graph compacts by selection (uniform, random, text_guided)"),
])
def test_compressions_the_graph_cannot_express_are_refused_with_the_reason(params, reason):
    model, inputs = build("tiny")
    policy = parse_policy(f"version: 1\nstages:\n  - {{name: a, steps: 1, passes: {{compress_visual_tokens: "
                          f"{params}}}}}\n")
    assert sparsify(model, policy, inputs).report.stages[0].lowerings["graph"] == f"not available: {reason}"
    with pytest.raises(GraphLoweringUnavailable) as err:
        fresh, fresh_inputs = build("tiny")  # the model above now carries sparsify's hooks
        transform(fresh, policy, fresh_inputs)
    assert str(err.value).endswith(reason)


def test_a_batch_whose_rows_drop_other_numbers_is_refused_by_the_graph():
    model, inputs, stages = lowered("tiny")
    fewer = {k: v.clone() for k, v in inputs.items()}
    fewer["input_ids"][1, 1:9] = 7  # a text token where 8 placeholders of the second image were
    with pytest.raises(Exception, match="this graph drops 32 positions in every row"):
        stages["alignment"](**fewer)


def padded_beyond_the_longest_row(inputs: dict) -> dict:
    """The example with one more padding position at the end of every row."""
    return {k: torch.nn.functional.pad(v, (0, 1), value=-100 if k == "labels" else 0) if v.dim() == 2 else v
            for k, v in inputs.items()}


def test_a_batch_padded_in_every_row_is_refused_by_the_graph():
    """The graph keeps padding (its length is fixed when it is built). The example (row 1 padded, row 0 not) is as
    long in both lowerings; a batch padded in every row would be shorter in the module lowering, and is refused."""
    model, inputs, stages = lowered("tiny")
    padded = padded_beyond_the_longest_row(inputs)
    with pytest.raises(Exception, match=r"stsc graph lowering: every row of this batch has padding; this graph keeps "
                                        r"it \(46 positions\) where the module lowering \(sparsify\) removes it "
                                        r"\(45\): use the module lowering for batches padded beyond their longest "
                                        r"row"):
        stages["alignment"](**padded)
    reason = ("every row of the example has padding: the graph keeps padding (its length is fixed when it is built) "
              "where the module lowering (sparsify) removes it")
    fresh, _ = build("tiny")
    assert sparsify(fresh, "sts", padded).report.stages[0].lowerings["graph"] == f"not available: {reason}"
    with pytest.raises(GraphLoweringUnavailable) as err:
        fresh, _ = build("tiny")
        transform(fresh, "sts", padded)
    assert str(err.value) == reason


def test_the_saved_program_takes_the_models_keyword_inputs(tmp_path):
    """``torch.export.load(path).module()(**batch)``: the skip flags filled in its ``stsc_skip`` buffer (a compressing
    stage also reads ``[step, micro step]`` from ``stsc_step``): the loss of the stage for that pattern and step."""
    model, inputs, stages = lowered("tiny")
    for name, skipped in (("instruction", [1, 2]), ("alignment", None)):
        graph = stages[name]
        torch.export.save(graph.exported, tmp_path / f"stage_{name}.pt2")
        program = torch.export.load(tmp_path / f"stage_{name}.pt2").module()
        assert list(inspect.signature(program.forward).parameters) == list(inputs)
        if skipped is not None:  # set as docs/lowerings.md, "Saved .pt2 programs", says
            program.stsc_skip = torch.tensor([i in skipped for i in range(4)])
        else:
            program.stsc_step = torch.tensor([3, 0])
        assert {"stsc_skip" if skipped else "stsc_step"} <= set(dict(program.named_buffers()))
        graph.set_progress(step=3)
        graph.force(skipped)
        try:
            expected = loss_of(graph(**inputs))
        finally:
            graph.force(None)
        reordered = {k: inputs[k] for k in reversed(list(inputs))}
        torch.testing.assert_close(program(**reordered)["loss"], expected, rtol=1e-6, atol=1e-6)


def test_the_saved_program_loads_in_a_fresh_process_and_trains(tmp_path):
    _, inputs, stages = lowered("tiny")
    path = tmp_path / "stage.pt2"
    torch.export.save(stages["instruction"].exported, path)
    saved_inputs = str(tmp_path / "inputs.pt")
    torch.save(inputs, saved_inputs)
    code = (f"import torch, stsc; program = torch.export.load({str(path)!r}).module(); "
            f"inputs = torch.load({saved_inputs!r}, weights_only=True); "
            "program.get_buffer('stsc_skip').copy_(torch.tensor([True, False, True, False])); "
            "loss = program(**inputs)['loss']; loss.backward(); "
            "print(round(loss.item(), 4), sum(p.grad is not None for p in program.parameters()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    loss, with_grad = result.stdout.split()
    assert float(loss) > 0 and int(with_grad) == 72


# ------------------------------------------------------------------------------ torch.compile backend
QUARTER_WITH_DENSE_FORWARDS = parse_policy(
    "version: 1\nstages:\n  - {name: alignment, steps: 10, passes: {compress_visual_tokens: "
    "{keep_ratio: 0.25, dense_fraction: 0.35}}}\n")


@pytest.mark.parametrize("policy, stage, dynamic, pattern", [
    ("sts", "instruction", None, [1, 2]),
    pytest.param("sts", "alignment", True, None, marks=pytest.mark.slow),
    pytest.param(QUARTER_WITH_DENSE_FORWARDS, "alignment", True, None, marks=pytest.mark.slow)])  # step 2 dense
def test_the_compile_backend_rewrites_dynamos_graph_and_equals_the_module_lowering(policy, stage, dynamic, pattern):
    model, inputs = build("tiny")
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    rewriter = backend(model, policy, inputs, stage=stage, compiler="aot_eager")
    compiled = torch.compile(model, backend=rewriter, dynamic=dynamic)
    sparse = sparsify(reference, policy, inputs, stage=stage)
    for step in range(3):
        for lowering in (rewriter, sparse):
            lowering.set_progress(epoch=0.0, step=step)
        rewriter.force(pattern)
        if pattern:
            sparse.runtimes["skip_layers"].force(pattern)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        compiled_loss, module_loss = loss_of(compiled(**inputs)), loss_of(sparse(**inputs))
        compiled_loss.backward()
        module_loss.backward()
        torch.testing.assert_close(compiled_loss, module_loss, rtol=1e-6, atol=1e-6)
        for param, expected in zip(model.parameters(), reference.parameters()):
            assert (param.grad is None) == (expected.grad is None)
            if param.grad is not None:
                torch.testing.assert_close(param.grad, expected.grad, rtol=1e-6, atol=1e-6)
    assert rewriter.graphs and all(g.startswith(("skip_layers: +25 nodes", "compress_visual_tokens: +8 nodes"))
                                   for g in rewriter.graphs)
    assert rewriter.runtime.last_dense == (policy is QUARTER_WITH_DENSE_FORWARDS)  # step 2
    rewriter.remove()
    torch._dynamo.reset()


def test_the_compile_backend_refuses_a_stage_that_compresses_and_skips():
    model, inputs = build("tiny")
    with pytest.raises(ValueError, match=r"^stage 'instruction' compresses visual tokens and skips blocks: the "
                                         r"compile backend does one of them per stage"):
        backend(model, "sts_fast", inputs, stage="instruction")


@pytest.mark.slow
def test_the_compile_backend_says_why_it_leaves_a_graph_as_it_is(monkeypatch):
    model, inputs = build("tiny")
    decoder_forward = tiny_llava.Decoder.forward

    def broken(self, *args, **kwargs):  # a graph break between the merge and the decoder
        torch._dynamo.graph_break()
        return decoder_forward(self, *args, **kwargs)

    monkeypatch.setattr(tiny_llava.Decoder, "forward", broken)
    torch._dynamo.reset()
    rewriter = backend(model, "sts", inputs, stage="alignment", compiler="aot_eager")
    loss_of(torch.compile(model, backend=rewriter, dynamic=True)(**inputs)).backward()
    assert "left as it is: this graph holds no decoder blocks but the merge: a graph break puts the merge and the " \
           "decoder in different graphs" in rewriter.graphs
    assert "left as it is: this graph holds the decoder blocks but not the merge: a graph break puts the merge and " \
           "the decoder in different graphs" in rewriter.graphs
    rewriter.remove()
    torch._dynamo.reset()
