"""The docs hold together: README.md and .ci/run agree, every page is reachable and built, and the Python in them runs.

CI runs exactly the test command the README gives; the README stays short and links every page of ``docs/``
(directly or through ``docs/index.md``), with links that resolve; ``mkdocs.yml`` lists every page; and every
```python block of the README and the docs runs on the bundled example (``examples/tiny_llava.py``), in page
order, except blocks marked ``<!-- not run: why -->`` on the line before (a launcher, a GPU, a Hugging Face stack).
"""

import ast
import re
import unicodedata
from pathlib import Path

import pytest
import torch
import yaml

import stsc
import tiny_llava

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NOT_RUN = re.compile(r"<!-- not run: \S.*-->")
# Pages whose runnable blocks take more than a few seconds (a sparsified training loop, torch.compile, a profile).
SLOW_PAGES = {"README.md", "getting-started.md", "lowerings.md", "passes.md", "profile.md", "benchmarks.md"}


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", README.read_text())


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_pins_torch_for_this_environment():
    assert all("torch==2.13.0" in command for command in readme_commands())


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 200


def links(path: Path) -> list[tuple[Path, str]]:
    """The (file, anchor) of every relative Markdown link in ``path`` (code spans left out)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        found.append(((path.parent / file).resolve() if file else path, anchor))
    return found


def slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (Python-Markdown's toc slugify, on the heading's text)."""
    text = re.sub(r"[`*]", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_links_resolve():
    for file, anchor in links(README):
        assert file.exists(), file
        assert not anchor or anchor in anchors(file), f"{file.name}#{anchor}"


def test_every_docs_page_is_reachable_from_the_readme():
    direct = {file for file, _ in links(README)}
    assert DOCS / "index.md" in direct
    reachable = direct | {file for file, _ in links(DOCS / "index.md")}
    assert set(PAGES) <= reachable, sorted(p.name for p in set(PAGES) - reachable)


def test_mkdocs_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    nav = [next(iter(entry.values())) for entry in config["nav"]]
    assert sorted(nav) == sorted(p.name for p in PAGES)


def test_readme_counts_the_support_table_rows():
    families = (DOCS / "families.md").read_text()
    begin, end = "<!-- support table: measured by tests/test_support_table.py -->", "<!-- end of support table -->"
    rows = families[families.index(begin) + len(begin):families.index(end)].strip().splitlines()[2:]
    count = re.search(r"(\d+) rows of the support table", README.read_text())
    assert count and int(count.group(1)) == len(rows)


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, runs) of every ```python block of ``path``; ``runs`` is False where the line before marks it."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.fullmatch(r"( *)```python", lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening.group(1), i
        i += 1
        while lines[i] != indent + "```":
            i += 1
        code = "\n".join(line[len(indent):] for line in lines[start + 1:i])
        blocks.append((start + 1, code, not (start > 0 and NOT_RUN.search(lines[start - 1]))))
        i += 1
    return blocks


def example_namespace() -> dict:
    """The names the docs' examples use without defining them, bound on the bundled example."""
    model = tiny_llava.build_model()
    inputs = tiny_llava.example_inputs(model)
    return {"torch": torch, "stsc": stsc, "model": model, "example_inputs": inputs, "inputs": inputs, "batch": inputs,
            "batches": [inputs], "loader": [inputs, inputs], "steps_per_epoch": 1, "policy": "sts",
            "build_model": tiny_llava.build_model,
            "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)}


def unbound_names(code: str) -> set[str]:
    """Names a block reads but never assigns."""
    names = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)]
    return {n.id for n in names if isinstance(n.ctx, ast.Load)} - {n.id for n in names if isinstance(n.ctx, ast.Store)}


def documented_pages():
    for path in [README, *PAGES]:
        if any(runs for _, _, runs in python_blocks(path)):
            marks = [pytest.mark.slow] if path.name in SLOW_PAGES else []
            yield pytest.param(path, id=path.name, marks=marks)


@pytest.mark.parametrize("path", documented_pages())
def test_python_blocks_run(path, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the README loads examples/tiny_llava.py
    monkeypatch.chdir(tmp_path)  # blocks that save files save them here
    namespace = example_namespace()
    for line, code, runs in python_blocks(path):
        if not runs:
            continue
        if "sparse" in unbound_names(code) and "sparse" not in namespace:  # a block that reads `sparse` only
            namespace["sparse"] = stsc.sparsify(namespace["model"], "sts", namespace["inputs"])
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"{path.name}:{line}: the block raised {type(error).__name__}: {error}")


def test_every_unrun_block_says_why():
    for path in [README, *PAGES]:
        for line in path.read_text().splitlines():
            if "<!-- not run" in line:
                assert NOT_RUN.search(line), f"{path.name}: {line}"
