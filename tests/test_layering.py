"""The import-layering contract of ``pyproject.toml`` ([tool.importlinter]): it holds for the package, and it would
catch an upward import.

The second test copies the package under another name (so that the installed ``smoe`` cannot shadow it), adds one
upward import, and runs the same contract on the copy: ``lint-imports`` must report it broken. Without that, a
contract that checked nothing (a typo in a layer name, say) would pass just as well.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("importlinter", reason="import-linter is a dev dependency (pip install -e '.[dev]')")


def _contract() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint(config: dict, pythonpath: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on ``config`` (the pyproject section, as a dict) in a fresh interpreter."""
    lines = ["[importlinter]", f"root_package = {config['root_package']}", ""]
    for i, c in enumerate(config["contracts"]):
        lines += [f"[importlinter:contract:{i}]", f"name = {c['name']}", f"type = {c['type']}", "layers ="]
        lines += [f"    {layer}" for layer in c["layers"]] + [""]
    ini = tmp_path / "contract.ini"
    ini.write_text("\n".join(lines))
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1]))"
    env = {"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code, str(ini)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )


def _renamed_copy(tmp_path: Path, name: str) -> tuple[dict, Path]:
    """The package copied to ``tmp_path/name`` with every ``smoe`` import renamed, and the contract to match."""
    dest = tmp_path / "src" / name
    shutil.copytree(ROOT / "smoe", dest, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dest.rglob("*.py"):
        f.write_text(re.sub(r"\bsmoe(?=[. ])", name, f.read_text()))
    config = _contract()
    config["root_package"] = name
    for c in config["contracts"]:
        c["layers"] = [re.sub(r"\bsmoe\.", f"{name}.", layer) for layer in c["layers"]]
    return config, dest.parent


def test_the_package_keeps_its_layers(tmp_path):
    config, src = _renamed_copy(tmp_path, "smoe_layering_ok")
    result = _lint(config, src, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("routing/plan.py", "from {pkg}.layers.moe import MoE as _Upward"),  # routing is the bottom layer
        ("experts/base.py", "from {pkg}.engine import run_plan as _upward"),  # experts sit below the engine
        ("engine/dispatcher.py", "import {pkg}.models.block as _upward"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    name = "smoe_layering_broken"
    config, src = _renamed_copy(tmp_path, name)
    target = src / name / module
    target.write_text(target.read_text() + "\n" + upward.format(pkg=name) + "\n")
    result = _lint(config, src, tmp_path)
    assert result.returncode != 0, result.stdout
    layer = module.split("/")[0]
    assert f"{name}.{layer} is not allowed to import" in result.stdout, result.stdout
