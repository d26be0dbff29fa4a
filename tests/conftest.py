import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def tiny():
    import tiny_llava

    model = tiny_llava.build_model()
    return model, tiny_llava.example_inputs(model)
