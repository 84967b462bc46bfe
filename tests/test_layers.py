"""The house rules of docs/architecture.md that imports must keep: layers pointing down, no cycles, a light
``import saliency_lab.metrics``, and one installed top-level name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

HEAVY = ("captum", "pytorch_grad_cam", "saliency_lab.explainers", "saliency_lab.lightning_modules",
         "saliency_lab.callbacks", "saliency_lab.networks", "saliency_lab.api")


def lint_imports() -> list[str]:
    """The ``lint-imports`` command of the interpreter running the tests."""
    script = Path(sys.executable).with_name("lint-imports")
    if not script.is_file():
        pytest.fail(f"import-linter is not installed next to {sys.executable}: pip install -e '.[test]'")
    return [str(script), "--no-cache"]


def test_import_contracts_hold(repo_root):
    """pyproject.toml's [tool.importlinter]: the layers, the stand-alone data modules, a foundation on torch /
    timm / torchvision only, nothing importing an entry point, no cycle inside a package."""
    proc = subprocess.run(lint_imports(), cwd=repo_root, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
    contracts = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert proc.stdout.count(" KEPT") == len(contracts) >= 6


def loaded_after(statement: str, repo_root: Path) -> set[str]:
    """Top-level names and ``saliency_lab.X`` subpackages of every module a fresh interpreter has loaded after
    ``statement``."""
    code = (f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{'.'.join(m.split('.')[:2]) if "
            f"m.startswith('saliency_lab.') else m.split('.')[0] for m in sys.modules}})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_metrics_loads_no_explainer_captum_or_lightning_module(repo_root):
    loaded = loaded_after("import saliency_lab.metrics, saliency_lab.metrics.report", repo_root)
    assert "saliency_lab.metrics" in loaded and "saliency_lab.core" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_import_explainers_loads_no_lightning_module_or_metric(repo_root):
    loaded = loaded_after("import saliency_lab.explainers", repo_root)
    assert {"saliency_lab.explainers", "saliency_lab.networks", "saliency_lab.core"} <= loaded
    assert not loaded & {"saliency_lab.lightning_modules", "saliency_lab.callbacks", "saliency_lab.metrics",
                         "pytorch_lightning"}


def test_one_package_and_its_layers_are_what_gets_installed(repo_root):
    """setuptools finds exactly one top-level package, saliency_lab, under src/ (no generic name such as
    ``metrics`` or ``evaluate`` lands in site-packages), and the configs and embedded assets ship as its data."""
    setuptools = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["where"] == ["src"]
    top = sorted(p.name for p in (repo_root / "src").iterdir() if (p / "__init__.py").is_file())
    assert top == ["saliency_lab"]
    data = setuptools["package-data"]["saliency_lab"]
    assert {"py.typed", "configs/**/*.yaml", "assets/*.pt", "assets/*.ckpt"} <= set(data)
