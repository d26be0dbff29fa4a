"""The `stsc` command line: output, exit codes and the one-line errors for bad model files."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_llava.py"


def stsc(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "stsc.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_inspect_prints_table():
    result = stsc("inspect", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "boundary     scatter (masked_scatter" in result.stdout
    assert "decoder      4 blocks" in result.stdout
    assert "decoder.layers.3" in result.stdout


def test_inspect_json():
    result = stsc("inspect", EXAMPLE, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blocks"] == [f"decoder.layers.{i}" for i in range(4)]
    assert report["boundary"]["kind"] == "scatter"
    assert report["boundary"]["tokens_per_image"] == 64
    assert report["boundary"]["grid"] == [8, 8]
    assert report["capture_method"] == "export"


def write(tmp_path, source):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.parametrize("source, message", [
    ("def example_inputs():\n    return {}\n",
     "{path}: no build_model() function; a model file must define build_model() and example_inputs()"),
    ("def build_model():\n    return 3\n\ndef example_inputs():\n    return {}\n",
     "{path}: build_model() returned int, expected a torch.nn.Module"),
    ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n\ndef example_inputs():\n    return [1]\n",
     "{path}: example_inputs() returned list, expected a dict of forward keyword arguments"),
    ("import torch\nx = 1\nimport not_a_module_anywhere\n",
     "{path}:3: failed to import: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def build_model(:\n    pass\n", "{path}:1: syntax error: invalid syntax"),
    ("def build_model():\n    raise ValueError('no weights')\n\ndef example_inputs():\n    return {}\n",
     "{path}:2: build_model() failed: ValueError: no weights"),
])
def test_bad_model_file_gives_one_line_error(tmp_path, source, message):
    path = write(tmp_path, source)
    result = stsc("inspect", path)
    assert result.returncode == 2
    assert result.stderr.strip() == "stsc: error: " + message.format(path=path)


def test_missing_file(tmp_path):
    result = stsc("inspect", tmp_path / "absent.py")
    assert result.returncode == 2
    assert result.stderr.strip() == f"stsc: error: {tmp_path / 'absent.py'}: no such file"


def test_unsupported_model_exits_3(tmp_path):
    path = write(tmp_path, """
        import torch
        def build_model():
            return torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
        def example_inputs():
            return {"input": torch.randint(0, 10, (2, 5))}
    """)
    result = stsc("inspect", path)
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1].startswith(f"stsc: error: {path}: model not supported: no decoder blocks found")


# ----------------------------------------------------------------------------------- transform
def test_transform_bundled_example_with_sts_preset(tmp_path):
    result = stsc("transform", EXAMPLE, ROOT / "policies" / "sts.yaml", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "stage 'alignment'  (epochs 0 to 1)" in result.stdout
    assert ("expected     decoder sequence 77 -> 45 positions per sample, 100.0 % of decoder blocks run, "
            "decoder FLOPs -45.6 %") in result.stdout
    assert "  lowerings    modules: ok; graph: available (stsc.transform)" in result.stdout
    assert "verified 'alignment' (modules lowering): train step ran (loss " in result.stdout
    assert "decoder sequence 45, blocks skipped [], 72/72 parameters got gradients); eval equals dense: yes" \
        in result.stdout
    assert ("graph lowering of 'instruction': skip_layers: +25 nodes (1 stsc_skip, 4 select_int, 4 stsc_identity, "
            "4 stsc_block, 4 cond, 4 getitem, 4 view_as_default), -192 nodes, 0 uses redirected") in result.stdout
    assert "verified 'instruction'" in result.stdout and "eval equals dense: NO" not in result.stdout
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["alignment", "instruction"]
    assert [c["sequence"] for c in report["verification"]] == [45, 77]
    assert report["graph_rewrites"]["alignment"][0].startswith("compress_visual_tokens: +8 nodes")
    code = (out / "stage_alignment.py").read_text()
    assert "torch.ops.stsc.compress_plan.default" in code and '"f32[2, s' in code  # a dynamic sequence length
    assert "torch.ops.higher_order.cond" in (out / "stage_instruction.py").read_text()
    assert (out / "stage_alignment.pt2").stat().st_size > 0 and (out / "stage_instruction.pt2").stat().st_size > 0
    assert (out / "policy.yaml").read_text().startswith("version: 1\nseed: 0\nstages:\n")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["sts", "sts_fast"])
def test_transform_verifies_the_graph_lowering_against_the_module_lowering(policy, tmp_path):
    result = stsc("transform", EXAMPLE, policy, "--lowering", "graph", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(graph lowering): train step ran") == 2
    assert result.stdout.count("loss equals the module lowering's: yes); eval equals dense: yes") == 2
    dense = sorted(path.name for path in tmp_path.glob("stage_*_dense.*"))  # the graph of the forwards drawn dense
    assert dense == ([] if policy == "sts" else ["stage_instruction_dense.pt2", "stage_instruction_dense.py"])


@pytest.mark.slow
def test_transform_graph_lowering_of_a_model_that_does_not_export_exits_3(tmp_path):
    path = write(tmp_path, HF_MODEL_FILE.format(examples=str(ROOT / "examples"), family="qwen2_vl"))
    result = stsc("transform", path, "vtc", "--lowering", "graph")
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1].startswith(
        f"stsc: error: {path}: stage 'alignment': graph lowering not available: the model does not export "
        "(torch.export failed: ")


HF_MODEL_FILE = """
    import sys
    sys.path.insert(0, {examples!r})
    import hf_models
    MODEL, INPUTS = hf_models.{family}()
    def build_model():
        return MODEL
    def example_inputs():
        return INPUTS
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_transform_hf_model_files(tmp_path, family):
    path = write(tmp_path, HF_MODEL_FILE.format(examples=str(ROOT / "examples"), family=family))
    result = stsc("transform", path, "sts")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("eval equals dense: yes") == 2


def test_transform_stage_option_applies_one_stage():
    result = stsc("transform", EXAMPLE, "sts", "--stage", "instruction")
    assert result.returncode == 0, result.stderr
    assert "stage 'alignment'" not in result.stdout and "verified 'instruction'" in result.stdout
    result = stsc("transform", EXAMPLE, "sts", "--stage", "pretrain")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("sts.yaml: no stage named 'pretrain'; stages: alignment, instruction")


def test_transform_model_the_passes_cannot_use_exits_3(tmp_path):
    path = write(tmp_path, HF_MODEL_FILE.format(examples=str(ROOT / "examples"), family="llama_text_only"))
    result = stsc("transform", path, "sts")
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1] == (
        f"stsc: error: {path}: model not supported: stage 'alignment', pass compress_visual_tokens: "
        "no vision boundary found: the model has no floating-point input (pixels) besides tokens")


def test_transform_bad_policy_exits_2(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nstages:\n  - name: a\n    epochs: 1\n    passes: {skip_layers: {alpah: 0.3}}\n")
    result = stsc("transform", EXAMPLE, policy)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"stsc: error: {policy}:5: stage 'a'.passes.skip_layers: unknown key 'alpah'; "
                                     "did you mean 'alpha'? allowed: schedule, alpha, eps, integer_epochs, "
                                     "never_skip_first, never_skip_last, min_kept, skip_kinds, seed")


def test_validate_and_plot(tmp_path):
    result = stsc("validate", "sts")
    assert result.returncode == 0 and "instruction: epochs 1 to 2" in result.stdout
    result = stsc("plot", "sts", "-o", tmp_path / "schedule.png", "--layers", "8")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "schedule.png").read_bytes()[:4] == b"\x89PNG"
    result = stsc("plot", "vtc", "-o", tmp_path / "x.png")
    assert result.returncode == 2 and result.stderr.strip().endswith("vtc.yaml: no stage runs skip_layers; nothing to plot")
