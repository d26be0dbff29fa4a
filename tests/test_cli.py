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
