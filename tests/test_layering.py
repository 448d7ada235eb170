"""Dependencies point one way: mmsoftmoe <- eval <- training <- benchmarks <- tests (README, "Layout"), checked on the
source."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level packages of this repository it must not import
# (folder, its installed name) -> installed top-level names of this repository it must not import
FORBIDDEN = {"mmsoftmoe": {"mmsoftmoe_training", "mmsoftmoe_eval", "benchmarks", "mmsoftmoe_cli"},
             "eval": {"mmsoftmoe_training", "benchmarks", "mmsoftmoe_cli"},
             "training": {"benchmarks", "mmsoftmoe_cli"},
             "benchmarks": {"tests"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return modules


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_floors(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        found = {m.split(".")[0] for m in imported_modules(path)} & FORBIDDEN[package]
        assert not found, f"{path.relative_to(ROOT)} imports {found}"


def test_training_borrows_no_figure_helpers_from_eval():
    for path in (ROOT / "training").rglob("*.py"):
        assert not {m for m in imported_modules(path) if m in ("mmsoftmoe_eval.report", "mmsoftmoe_eval.plots")}, path


def test_the_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from mmsoftmoe_training.loop import train_step\nimport mmsoftmoe_eval.main as m\n")
    assert {"mmsoftmoe_training.loop", "mmsoftmoe_eval.main"} <= imported_modules(bad)
