"""The Layer Dynamic Skipper pass on the bundled example and tiny Hugging Face families."""

import copy

import pytest
import torch

import hf_models
import tiny_llava
from stsc import capture, match
from stsc.capture import forward_kwargs
from stsc.passes.skip_layers import SkipLayersConfig, apply


def build(family):
    if family == "tiny":
        model = tiny_llava.build_model()
        return model, tiny_llava.example_inputs(model)
    return hf_models.BUILDERS[family]()


def skip_pass(model, inputs, **config):
    structure = match(capture(model, inputs))
    return apply(model, structure, SkipLayersConfig(**config), inputs)


def run(model, inputs):
    return model(**forward_kwargs(model, inputs)[0])


def identity_reference(model, block_path):
    """A copy of ``model`` (unguarded) with one block replaced by the identity on its hidden state."""
    reference = copy.deepcopy(model)
    block = reference.get_submodule(block_path)
    block.forward = lambda hidden, *args, **kwargs: hidden
    return reference


FAMILIES = ["tiny", "llava", "mllama", "qwen2_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_skip_equals_identity_block(family):
    model, inputs = build(family)
    original = copy.deepcopy(model)
    skipper, info = skip_pass(model, inputs)
    assert info.matched == len(skipper.paths) >= 3
    layer = 1
    skipper.force([layer])
    out = run(model, inputs)
    assert skipper.last_skipped == [layer]
    torch.testing.assert_close(out["logits"], run(identity_reference(original, skipper.paths[layer]), inputs)["logits"],
                               rtol=0, atol=0)
    assert not torch.equal(out["logits"], run(identity_reference(original, skipper.paths[0]), inputs)["logits"])


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_block_gets_no_gradient(family):
    model, inputs = build(family)
    skipper, _ = skip_pass(model, inputs)
    skipper.force([1])
    model.zero_grad(set_to_none=True)
    run(model, inputs)["loss"].backward()
    skipped = model.get_submodule(skipper.paths[1])
    assert all(p.grad is None for p in skipped.parameters())
    for path in skipper.paths[:1] + skipper.paths[2:]:
        assert all(p.grad is not None for p in model.get_submodule(path).parameters() if p.requires_grad)


def test_grad_is_none_only_if_skipped_in_every_micro_batch(tiny):
    model = copy.deepcopy(tiny[0])
    skipper, _ = skip_pass(model, tiny[1])
    block = model.get_submodule(skipper.paths[2])
    model.zero_grad(set_to_none=True)
    skipper.force([2])
    run(model, tiny[1])["loss"].backward()
    assert block.o_proj.weight.grad is None
    skipper.force([])
    run(model, tiny[1])["loss"].backward()  # second micro-batch runs the block
    assert block.o_proj.weight.grad is not None


def test_a_skipped_block_runs_none_of_its_hooks(tiny):
    # engines hook the block's call: FSDP2 all-gathers in a pre-forward hook, DeepSpeed ZeRO-3 fetches in one
    model = copy.deepcopy(tiny[0])
    skipper, _ = skip_pass(model, tiny[1])
    calls = []
    for index, path in enumerate(skipper.paths):
        model.get_submodule(path).register_forward_pre_hook(lambda *_, index=index: calls.append(index))
    skipper.force([1, 2])
    run(model, tiny[1])
    assert calls == [0, 3]


def test_a_deep_copy_guards_its_own_blocks(tiny):
    model = copy.deepcopy(tiny[0])
    skipper, _ = skip_pass(model, tiny[1])
    skipper.force([1])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert not torch.equal(run(twin, tiny[1])["logits"], run(model, tiny[1])["logits"])
    twin_skipper = twin.get_submodule(skipper.paths[0])._call_impl.skipper
    assert twin_skipper is not skipper and twin_skipper.last_skipped == [1]


@pytest.mark.parametrize("family", ["tiny", "mllama"])
def test_eval_is_the_dense_model(family):
    model, inputs = build(family)
    dense = copy.deepcopy(model).eval()
    skipper, _ = skip_pass(model, inputs, alpha=0.5, eps=1.0)
    skipper.force(list(range(len(skipper.paths) - 1)))
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, inputs)["logits"], run(dense, inputs)["logits"])


def test_state_dict_keys_and_parameters_unchanged(tiny):
    model = copy.deepcopy(tiny[0])
    keys, params = list(model.state_dict()), list(model.parameters())
    skipper, _ = skip_pass(model, tiny[1])
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    skipper.remove()
    assert "_call_impl" not in model.get_submodule(skipper.paths[0]).__dict__


def test_decisions_follow_seed_and_step_and_resume(tiny):
    model = copy.deepcopy(tiny[0])
    skipper, _ = skip_pass(model, tiny[1], alpha=0.5, eps=1.0, seed=11)
    patterns = []
    for step in range(6):
        skipper.set_progress(step=step, epoch=step / 10)
        run(model, tiny[1])
        patterns.append(skipper.last_skipped)
    state = {"progress": 0.2, "step": 2, "micro_step": 0}
    skipper.load_state_dict(state)
    run(model, tiny[1])
    assert skipper.last_skipped == patterns[2]
    assert len({tuple(p) for p in patterns}) > 1


def test_mixed_stack_can_keep_one_kind_dense():
    model, inputs = hf_models.mllama(layers=4, cross_attention_layers=(1, 3))
    skipper, info = skip_pass(model, inputs, skip_kinds=(0,))
    assert info.details["skippable"] == [skipper.paths[0], skipper.paths[2]]
    assert info.details["not_skippable"] == {skipper.paths[1]: "its kind is not in skip_kinds",
                                             skipper.paths[3]: "its kind is not in skip_kinds"}
    assert skipper.probabilities()[1] == skipper.probabilities()[3] == 0.0


def test_report_gives_the_mean_skip_fraction(tiny):
    model = copy.deepcopy(tiny[0])
    _, info = skip_pass(model, tiny[1], alpha=0.6, eps=0.5)
    assert info.details["mean_skip_fraction_over_stage"] == pytest.approx(0.6 / 3, rel=1e-3)


class SelectingBlock(torch.nn.Module):
    """A residual block that attends only to the top-k positions it selects from its hidden state (``selects``), or
    to those the block before it selected (``previous``, passed on); it returns the selection with its hidden state."""

    def __init__(self, dim, selects):
        super().__init__()
        self.score = torch.nn.Linear(dim, dim) if selects else None
        self.value, self.out = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, hidden, previous=None):
        selection = previous if self.score is None else (hidden @ self.score(hidden).transpose(1, 2)).topk(3).indices
        b, t, d = hidden.shape
        picked = self.value(hidden).gather(1, selection.reshape(b, -1, 1).expand(-1, -1, d)).view(b, t, 3, d)
        return hidden + self.out(picked.mean(2)), selection


class SelectingStack(torch.nn.Module):
    """Blocks 0, 1 and 4 select, blocks 2 and 3 reuse the selection before them; each block's selection is its
    second output, which the stack passes to the next block."""

    def __init__(self, dim=16, vocab=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(SelectingBlock(dim, selects) for selects in (1, 1, 0, 0, 1))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, labels):
        hidden, selection = self.embed(input_ids), None
        for layer in self.layers:
            hidden, selection = layer(hidden, previous=selection)
        logits = self.head(hidden)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def test_a_skipped_block_passes_on_the_selection_it_received():
    """Skipped, a block returns its hidden input and the selection of the block before it, which the next block reads
    as the stack without it would; the first block receives none (nothing to pass on), so it is kept."""
    torch.manual_seed(0)
    model = SelectingStack().train()
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    original = copy.deepcopy(model)
    skipper, info = skip_pass(model, inputs)
    assert info.details["skippable"] == [f"layers.{i}" for i in range(1, 5)]
    assert info.details["not_skippable"] == {"layers.0": "its output has other tensors besides the hidden state that "
                                             "it does not receive from the block before it (to pass them on when "
                                             "skipped), or it did not run"}
    skipper.force([1, 3])
    out = run(model, inputs)
    assert skipper.last_skipped == [1, 3]
    reference = copy.deepcopy(original)
    for i in (1, 3):
        reference.layers[i].forward = lambda hidden, previous=None: (hidden, previous)
    torch.testing.assert_close(out["logits"], run(reference, inputs)["logits"], rtol=0, atol=0)
    assert not torch.equal(out["logits"], run(original, inputs)["logits"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, inputs)["logits"], run(original.eval(), inputs)["logits"])


class StoringBlock(SelectingBlock):
    """A selecting block that keeps its values in ``store`` for a later block (``keeps``), or adds the values kept
    there to its own (``reads``): latent keys and values shared through a store, as in Mistral Large 4."""

    def __init__(self, dim, selects, keeps=False, reads=False):
        super().__init__(dim, selects)
        self.keeps, self.reads = keeps, reads

    def forward(self, hidden, store, previous=None):
        selection = previous if self.score is None else (hidden @ self.score(hidden).transpose(1, 2)).topk(3).indices
        values = self.value(hidden) + store["values"] if self.reads else self.value(hidden)
        if self.keeps:
            store["values"] = values
        b, t, d = hidden.shape
        picked = values.gather(1, selection.reshape(b, -1, 1).expand(-1, -1, d)).view(b, t, 3, d)
        return hidden + self.out(picked.mean(2)), selection


class StoringStack(SelectingStack):
    """SelectingStack whose block 1 keeps its values in a store that block 2 attends to."""

    def __init__(self, dim=16, vocab=32):
        super().__init__(dim, vocab)
        self.layers = torch.nn.ModuleList(StoringBlock(dim, selects, keeps=i == 1, reads=i == 2)
                                          for i, selects in enumerate((1, 1, 0, 0, 1)))

    def forward(self, input_ids, labels):
        hidden, selection, store = self.embed(input_ids), None, {}
        for layer in self.layers:
            hidden, selection = layer(hidden, store, previous=selection)
        logits = self.head(hidden)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def test_a_block_whose_stored_values_the_next_block_reads_is_kept_though_it_passes_on_a_selection():
    """Block 1 returns its selection, which block 2 receives, and keeps values in a store that block 2 reads: passing
    on the selection (which block 3 reads too) does not stand in for the stored values (shape and dtype differ), so
    block 1 is never skipped."""
    torch.manual_seed(0)
    model = StoringStack().train()
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))
    _, info = skip_pass(model, {"input_ids": ids, "labels": ids})
    assert info.details["skippable"] == ["layers.2", "layers.3", "layers.4"]
    assert info.details["not_skippable"]["layers.1"] == ("blocks [2, 3] read values it computes besides its output "
                                                         "(e.g. shared keys and values)")
