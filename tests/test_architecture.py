"""The shape of the library: the import contracts hold, and they fail, naming the import, when
broken; wings say what they are for; modules stay small; one name means one thing.

The contracts themselves live in pyproject.toml ([tool.importlinter]) and `make test` runs
`lint-imports` before pytest; these tests check that they hold here and that they would catch
the two wrong imports a newcomer would most plausibly add (a method module drawing a figure, and
a circle inside a wing), so a contract that matches nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
WINGS = ("store", "models", "method", "heal", "evaluate", "report", "config")
MAX_LINES = 350
# The api's doors are named after the library functions they wrap (api.heal runs heal.run.heal
# on files); every other public name is defined once.
DOORS = {"heal", "evaluate", "prune", "distances", "loss", "speed"}


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def _copy_of_the_code(tmp_path: Path) -> Path:
    for name in ("layerprune", "tasks", "flows"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_import_contracts_hold():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "4 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, line, named", [
    # the method drawing (it returns numbers; report/ draws them): an upward import
    ("method/distances.py", "from layerprune.report import figures",
     "layerprune.method.distances -> layerprune.report.figures"),
    # a lazy import counts as much as one at the top of the module
    ("heal/run.py", "def f():\n    from layerprune.evaluate import speed",
     "layerprune.heal.run -> layerprune.evaluate.speed"),
    # a circle inside one wing: the layers contract cannot see it, acyclic_siblings does
    ("method/layer_config.py", "from layerprune.method import prune",
     "No cycles are allowed in layerprune.method"),
    # the library must not know Prefect
    ("store/files.py", "import prefect", "layerprune.store.files -> prefect"),
])
def test_a_wrong_import_fails_with_a_message_that_names_it(tmp_path, module, line, named):
    root = _copy_of_the_code(tmp_path)
    target = root / "layerprune" / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    out = _lint(root)
    assert out.returncode != 0
    assert "broken" in out.stdout and named in out.stdout, out.stdout[-3000:]


def _modules():
    return sorted((REPO / "layerprune").rglob("*.py"))


def test_every_wing_says_what_it_is_for_and_what_it_may_import():
    for wing in WINGS:
        init = REPO / "layerprune" / wing / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import:" in doc, f"{init}: the docstring must say what the wing may import"


def test_every_module_has_a_docstring_and_stays_small():
    too_long = {str(p.relative_to(REPO)): n for p in _modules()
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
    undocumented = [str(p.relative_to(REPO)) for p in _modules()
                    if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not undocumented


def test_one_public_name_means_one_thing():
    """Catches two functions of one name with different meanings, as `check_context` was
    (a model's context check, and speed's check of two lengths against a known context)."""
    where: dict[str, list[str]] = {}
    for p in _modules():
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(str(p.relative_to(REPO)))
    twice = {name: files for name, files in where.items() if len(files) > 1
             and not (name in DOORS and "layerprune/api.py" in files and len(files) == 2)}
    assert not twice, twice
