"""Capture + match on the bundled example and on tiny builds of Hugging Face MLLM families."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import hf_models
import tiny_llava
from stsc import inspect, sparsify
from stsc.layout import images_in, pictures_in

TINY_BLOCKS = [f"decoder.layers.{i}" for i in range(4)]


@pytest.mark.parametrize("merge, kind", [("scatter", "scatter"), ("concat", "concat")])
def test_bundled_example(merge, kind):
    model = tiny_llava.build_model(merge=merge)
    report = inspect(model, tiny_llava.example_inputs(model))
    assert report.capture_method == "export"
    assert report.blocks == TINY_BLOCKS
    assert report.vision_blocks == ["vision.blocks.0", "vision.blocks.1"]
    b = report.boundary
    assert (b.kind, b.tokens_per_image, b.grid, b.images) == (kind, 64, (8, 8), 2)
    assert b.producer_module == "projector"
    assert b.placeholder_id == (tiny_llava.IMAGE_TOKEN_ID if merge == "scatter" else None)
    assert b.token_input == "input_ids" and b.vision_inputs == ["pixel_values"]
    assert b.decoder_entry == "decoder"
    if merge == "scatter":
        assert b.positions.code == f"eq(input_ids, {tiny_llava.IMAGE_TOKEN_ID})"
    else:
        assert (b.positions.offset, b.positions.count) == (0, 64)


@pytest.mark.parametrize("family", ["llava", "paligemma", "gemma3", "idefics3", "mllama", "qwen2_vl", "gemma4_unified"])
def test_hf_family(family):
    model, inputs = hf_models.BUILDERS[family]()
    expected = model.stsc_expected
    report = inspect(model, inputs)
    assert report.blocks == expected.blocks
    assert report.boundary.kind == expected.boundary_kind
    assert report.boundary.tokens_per_image == expected.tokens_per_image
    assert report.boundary.placeholder_id == expected.placeholder_id
    assert report.support == {"compress_visual_tokens": "ok", "skip_layers": "ok"}


def test_grid_from_patch_convolution():
    model, inputs = hf_models.llava()
    assert inspect(model, inputs).boundary.grid == (4, 4)


def test_mixed_stack_reports_two_block_kinds():
    model, inputs = hf_models.mllama(layers=4, cross_attention_layers=(1, 3))
    report = inspect(model, inputs)
    assert report.block_kinds == 2
    kinds = [b.kind for b in report.block_details]
    assert kinds[0] == kinds[2] and kinds[1] == kinds[3] and kinds[0] != kinds[1]
    assert report.boundary.merge_op == "scaled_dot_product_attention"
    assert report.boundary.producer_module == "model.multi_modal_projector"


def test_a_stack_whose_blocks_all_differ_is_found():
    """A short decoder may have no two blocks alike (dense and MoE MLPs, own and shared keys, RoPE and NoPE: Mistral
    Large 4's four blocks): two items of one list make a stack without a repeated kind. Here every MLP differs."""
    model = tiny_llava.build_model()
    for i, layer in enumerate(model.decoder.layers):
        width, hidden = 32 + 16 * i, layer.gate_proj.in_features
        layer.gate_proj, layer.up_proj = (torch.nn.Linear(hidden, width, bias=False) for _ in range(2))
        layer.down_proj = torch.nn.Linear(width, hidden, bias=False)
    report = inspect(model, tiny_llava.example_inputs(model))
    assert report.blocks == TINY_BLOCKS and report.block_kinds == 4


def test_export_failure_falls_back_to_a_real_tensor_trace_and_is_reported():
    model, inputs = hf_models.qwen2_vl()
    report = inspect(model, inputs)
    assert report.capture_method == "trace" and report.graphs == 1
    assert report.fallback_reason.startswith("torch.export failed: ")
    assert report.boundary.merge_op == "masked_scatter"
    assert report.vision_blocks == ["model.visual.blocks.0", "model.visual.blocks.1"]


def test_dynamo_is_the_last_resort(monkeypatch):
    capture_module = importlib.import_module("stsc.capture")  # `stsc.capture` is also the function
    monkeypatch.setattr(capture_module, "_trace", lambda *_: RuntimeError("no trace"))
    model, inputs = hf_models.qwen2_vl()
    report = inspect(model, inputs)
    assert report.capture_method == "dynamo" and report.graphs > 1
    assert report.fallback_reason.endswith("; the real-tensor trace failed: RuntimeError: no trace")
    assert report.boundary.merge_op == "masked_scatter" and report.blocks == model.stsc_expected.blocks


def test_a_module_under_two_parents_keeps_the_traced_paths_from_the_model(monkeypatch):
    """A module shared by two parents (one norm reused) makes make_fx name modules by the attributes read to reach
    them: the paths still start at the model, not at the wrapper the trace calls it through."""
    monkeypatch.setattr(importlib.import_module("stsc.capture"), "_export", lambda *_: RuntimeError("no export"))
    model = tiny_llava.build_model()
    model.vision.blocks[1].norm1 = model.vision.blocks[0].norm1
    report = inspect(model, tiny_llava.example_inputs(model))
    assert report.capture_method == "trace" and report.blocks == TINY_BLOCKS
    assert report.vision_blocks == ["vision.blocks.0", "vision.blocks.1"]
    assert (report.boundary.producer_module, report.boundary.decoder_entry) == ("projector.fc2", "decoder")


class PadSequences(torch.nn.Module):
    """Each image's features padded by ``pad_sequence``: copied in place into slices of a new zero buffer."""

    def forward(self, x):
        return torch.nn.utils.rnn.pad_sequence(list(x.unbind(0)), batch_first=True)


def test_values_copied_into_a_new_buffer_flow_on_to_its_readers(monkeypatch):
    """The real-tensor trace records in-place writes as they run (``copy_`` into a view of a new buffer, then the
    buffer read): the features still reach the merge, so the boundary is found."""
    monkeypatch.setattr(importlib.import_module("stsc.capture"), "_export", lambda *_: RuntimeError("no export"))
    model = tiny_llava.build_model()
    model.vision.norm = torch.nn.Sequential(model.vision.norm, PadSequences())
    report = inspect(model, tiny_llava.example_inputs(model))
    assert report.capture_method == "trace" and report.blocks == TINY_BLOCKS
    b = report.boundary
    assert (b.kind, b.tokens_per_image, b.images, b.vision_inputs) == ("scatter", 64, 2, ["pixel_values"])
    assert report.support == {"compress_visual_tokens": "ok", "skip_layers": "ok"}


def test_use_cache_is_disabled_for_capture_and_said():
    model, inputs = hf_models.llava()
    report = inspect(model, inputs)
    assert report.capture_method == "export"
    assert report.capture_notes == ["passed use_cache=False (no cache is needed for training)"]


def test_text_only_model_reports_blocks_and_no_boundary():
    model, inputs = hf_models.llama_text_only()
    report = inspect(model, inputs)
    assert report.blocks == model.stsc_expected.blocks
    assert report.boundary is None
    assert any(note.startswith("no vision boundary found") for note in report.notes)
    assert "no vision boundary found" in report.format()


@pytest.mark.parametrize("build", [
    lambda: (tiny_llava.TinyLlava(tiny_llava.TinyLlavaConfig()), tiny_llava.example_inputs()),
    lambda: (hf_models.llava()[0].__class__(hf_models.llava()[0].config), hf_models.llava()[1]),
], ids=["tiny", "llava"])
def test_meta_device_model_needs_no_weights(build):
    with torch.device("meta"):
        model, inputs = build()
    assert next(model.parameters()).device.type == "meta"
    report = inspect(model, inputs)
    assert len(report.blocks) >= 3 and report.boundary.kind == "scatter"
    assert report.boundary.tokens_per_image in (16, 64)


def test_exported_graph_trains_the_users_parameters(tiny):
    from stsc import capture

    model, inputs = tiny
    cap = capture(model, inputs)
    graph_params = dict(cap.exported.module().named_parameters())
    assert all(graph_params[name] is param for name, param in model.named_parameters())


def test_model_without_blocks_says_what_was_looked_for():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    report = inspect(model.train(), {"input": torch.randint(0, 10, (2, 5))})
    assert report.blocks == [] and not report.supported
    assert any(note.startswith("no decoder blocks found: looked for sibling modules that run one after another")
               for note in report.notes)


def test_visual_tokens_walk_back_past_type_as_to_the_projector():
    """Gemma3's projector ends in ``projected.type_as(vision_outputs)``: the template operand is not the data."""
    model, inputs = hf_models.gemma3()
    boundary = inspect(model, inputs).boundary
    assert boundary.producer_module == "model.multi_modal_projector"
    assert boundary.visual_shape == (2, 16, 64)


class TimeScaledFeatures(tiny_llava.TinyLlava):
    """The vision features are multiplied by a cosine of each placeholder's rank in its row, computed from the ids
    alone (as rotary time embeddings of audio clips are), then projected and written into the placeholders."""

    def forward(self, input_ids, pixel_values, attention_mask, labels):
        placeholders = input_ids == tiny_llava.IMAGE_TOKEN_ID
        features = self.vision(pixel_values)
        ranks = placeholders.float().cumsum(1)[:, 1:1 + features.shape[1], None]
        features = self.projector(features * torch.cos(0.1 * ranks))
        embeds = self.decoder.embed_tokens(input_ids)
        embeds = embeds.masked_scatter(placeholders[..., None].expand_as(embeds), features)
        logits = self.lm_head(self.decoder(embeds, attention_mask))
        return {"loss": F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)}


def test_features_scaled_by_values_of_the_ids_alone_merge_where_they_meet_the_embeddings():
    """The product of the features and the ids' cosines depends on pixels and tokens, but not on the embeddings the
    token input looks up: the merge is the later write into the embedded sequence; the visual tokens, the last value
    computed from the pixels alone, are the vision encoder's output."""
    torch.manual_seed(0)
    model = TimeScaledFeatures(tiny_llava.TinyLlavaConfig()).train()
    inputs = tiny_llava.example_inputs(model)
    sparse = sparsify(model, "vtc", inputs)
    b = sparse.report.model.boundary
    assert (b.kind, b.merge_op, b.producer_module, b.tokens_per_image) == ("scatter", "masked_scatter", "vision", 64)
    sparse(**inputs)["loss"].backward()
    assert sparse.runtimes["compress_visual_tokens"].last_plan.kept == 64  # 32 of each image's 64

def test_blocks_are_found_without_a_token_input(tiny, monkeypatch):
    """Where no token input is found, the integer inputs stand for the token stream: skipping still works."""
    monkeypatch.setattr(importlib.import_module("stsc.match"), "_token_input", lambda flow, order: (None, None))
    report = inspect(*tiny)
    assert report.blocks == TINY_BLOCKS and report.boundary is None
    assert report.notes == ["no token input: looked for an integer model input that indexes an embedding lookup"]
    assert report.support["skip_layers"] == "ok"
    assert report.support["compress_visual_tokens"].startswith("not supported: no token input")


def test_views_of_one_picture_are_opened_by_different_markers():
    """Views opened by markers (ids found only right before an image) other than the picture's first marker
    continue the picture: a low-resolution view (marker 5) then a high-resolution one (marker 6); a picture opened
    by the first marker again, and an image opened by an ordinary token (8, also found in the text), stand alone."""
    row = [1, 5, 3, 3, 7, 6, 3, 3, 3, 7, 8, 5, 3, 3, 7, 8, 3, 3, 8]
    ids = torch.tensor([row])
    pictures = pictures_in(images_in(ids == 3), ids)
    assert [[image.positions for image in picture] for picture in pictures] == [
        [(2, 3), (6, 7, 8)], [(12, 13)], [(16, 17)]]


class ReadOutDecoder(tiny_llava.Decoder):
    """The layers, then a read-out that scales the hidden state by one weight of its width (reading it once: no
    residual block) and a norm of the same width: siblings of the layer list of one kind."""

    class Scale(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(width))

        def forward(self, hidden):
            return hidden * self.weight

    def __init__(self, cfg):
        super().__init__(cfg)
        self.final_norm, self.norm = self.norm, self.Scale(cfg.hidden_size)

    def forward(self, inputs_embeds, attention_mask):
        return self.final_norm(super().forward(inputs_embeds, attention_mask))


def test_modules_after_the_layer_list_are_no_blocks_even_of_one_kind():
    model = tiny_llava.build_model()
    model.decoder = ReadOutDecoder(model.config)
    assert inspect(model, tiny_llava.example_inputs(model)).blocks == TINY_BLOCKS


class LoopedLayers(torch.nn.ModuleList):
    """Layers 1 and 2 run twice: the second pass restarts from layer 0's output plus a message, a side module's
    projection of the first pass's output, called between the items (after layer 2 and before layer 3)."""

    def __init__(self, layers, width):
        super().__init__(layers)
        self.message = torch.nn.Linear(width, width)

    def __iter__(self):
        kept = {}

        def first(hidden, *args):
            kept["hidden"] = self[0](hidden, *args)
            return kept["hidden"]

        def restart(hidden, *args):
            return kept["hidden"] + self.message(hidden)

        return iter([first, self[1], self[2], restart, self[1], self[2], self[3]])


def test_a_side_module_called_between_looped_layers_is_no_block_and_ends_no_run():
    model = tiny_llava.build_model()
    model.decoder.layers = LoopedLayers(model.decoder.layers, model.config.hidden_size)
    report = inspect(model, tiny_llava.example_inputs(model))
    assert report.blocks == TINY_BLOCKS and report.support["skip_layers"] == "ok"
