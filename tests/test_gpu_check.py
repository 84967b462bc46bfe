"""benchmarks/gpu_check.py, the check ready for the first GPU machine: its quick CPU run writes every key and the
table; the same run works where W&B cannot be imported and the only packages visible are the GPU machines' own
(torch, torchvision, lightning, timm, torchmetrics, onnx and what they require) and the list build/gpu_deps is
built from, and imports nothing else; a failing or overlong section is recorded while the others still run; the
embedded section trains the recipe its config names."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from benchmarks import gpu_check
from tests.conftest import ROOT, subprocess_env

# Generous time boxes: a loaded 2-core machine must not turn the quick run's sections into timeouts.
QUICK = ["--scale", "quick", "--device", "cpu", "--threads", "1", "--budget", "900", "--commit", "test-commit"]
TABLE_ROWS = 12  # 3 environment + 3 predictor batches + 2 explainers + 2 protocols + embedded + imports
NO_WANDB = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = ['gpu_check'] + sys.argv[1:]; "
            "runpy.run_module('benchmarks.gpu_check', run_name='__main__', alter_sys=True)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names) -> dict[str, metadata.Distribution]:
    """The installed distributions of ``names`` and of everything they require (no extras), by canonical name."""
    found, todo = {}, list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        try:
            found[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return {name: dist for name, dist in found.items() if dist is not None}


def _top_level(dist: metadata.Distribution) -> set[str]:
    """The top-level files and folders a distribution installs (packages, modules, extension modules)."""
    names = set()
    for file in dist.files or []:
        top = file.parts[0]
        if top in ("..", "__pycache__") or top.endswith((".dist-info", ".data", ".pth")):
            continue
        names.add(top)
    return names


@pytest.fixture(scope="module")
def device_site(tmp_path_factory) -> tuple[Path, set[str]]:
    """A folder that shows only the GPU machines' packages and GPU_DEPS (links into this environment), and the
    top-level module names they provide."""
    site = tmp_path_factory.mktemp("device_site")
    # lightning itself is not installed here: pytorch-lightning, which every lightning >= 2.2 requires, stands in
    wanted = [*gpu_check.DEVICE_PACKAGES, "pytorch-lightning", *(Requirement(d).name for d in gpu_check.GPU_DEPS)]
    modules = set()
    for dist in _closure(wanted).values():
        for top in _top_level(dist):
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
            modules.add(top.split(".")[0])
        for record in (f for f in dist.files or [] if f.name == "METADATA"):
            info = Path(dist.locate_file(record)).parent  # .dist-info: the packages read their versions from it
            if not (site / info.name).exists():
                (site / info.name).symlink_to(info)
    return site, modules


def _check(report: dict, markdown: str) -> None:
    """Every key, no error, sane figures, and the table under its header."""
    assert set(report) == set(gpu_check.empty_report())
    for section in gpu_check.SECTIONS:
        assert set(report[section]) == set(gpu_check.SECTION_KEYS[section]), section
    assert report["errors"] == {}
    assert report["scale"] == "quick" and report["device"] == "cpu" and report["commit"] == "test-commit"
    assert report["environment"]["torch"] and isinstance(report["environment"]["gpus"], list)
    rows = report["mask_predictor"]["rows"]
    assert [r["batch_size"] for r in rows] == list(gpu_check.SCALES["quick"].predictor_batches)
    for row in rows:
        assert set(row) == set(gpu_check.PREDICTOR_ROW_KEYS) and row["error"] is None
        assert row["step_seconds"] > 0 and row["images_per_second"] > 0 and row["peak_memory_mib"] > 0
    assert report["mask_predictor"]["precision"] in ("bf16-mixed", "32-true")
    for name in ("igos_pp", "iassa"):
        result = report[name]
        assert result["batch_seconds"] > 0 and result["single_seconds"] > 0 and result["ratio"] > 0
        assert result["maps_agree"] is True and result["tolerance"] == gpu_check.MAP_TOLERANCE
        assert 1 <= result["singles_measured"] <= result["images"]
    for row in report["causal_metrics"]["rows"]:
        assert set(row) == set(gpu_check.METRIC_ROW_KEYS) and row["images_per_second"] > 0
    embedded = report["embedded_predictor"]
    assert embedded["train_images_per_second"] > 0 and embedded["forward_backward_images_per_second"] > 0
    assert embedded["ratio"] == pytest.approx(embedded["train_images_per_second"]
                                              / embedded["forward_backward_images_per_second"], rel=0.01)
    assert "torch" in report["imported_modules"] and "saliency_lab" not in report["imported_modules"]

    lines = markdown.splitlines()
    for label in ("date", "commit", "machine", "command"):
        assert any(line.startswith(f"- {label}: ") for line in lines), label
    start = lines.index("| section | measurement | setting | result |")
    assert lines[start + 1] == "|---|---|---|---|"
    table = [line for line in lines[start + 2:] if line.startswith("|")]
    assert len(table) == TABLE_ROWS and all(line.count("|") == 5 for line in table)
    assert "error" not in markdown.lower().replace("errors", "")


def _run(command: list[str], out: Path, env: dict) -> tuple[dict, str]:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_quick_cpu_run_writes_every_key_and_the_table(tmp_path):
    started = time.monotonic()
    report, markdown = _run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), *QUICK], tmp_path,
                            subprocess_env())
    _check(report, markdown)
    assert time.monotonic() - started < 300


@pytest.mark.slow
def test_runs_without_wandb_on_the_device_packages_alone(tmp_path, device_site):
    site, allowed = device_site
    env = subprocess_env()
    # -S: no site-packages; only the device's packages (linked), the project's src and the repository root
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "src"), str(ROOT)])
    report, markdown = _run([sys.executable, "-S", "-c", NO_WANDB, "--out", str(tmp_path), *QUICK], tmp_path, env)
    _check(report, markdown)
    imported = set(report["imported_modules"])
    assert "wandb" not in imported
    assert imported <= allowed, f"imports beyond the GPU machines' packages and GPU_DEPS: {sorted(imported - allowed)}"


def test_a_failing_or_overlong_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    ran = []

    def fails(result, ctx):
        raise RuntimeError("out of memory (on purpose)")

    def overruns(result, ctx):
        result["batch_seconds"] = 1.0  # what a section measured before its time box ended is kept
        while True:
            time.sleep(0.01)

    monkeypatch.setitem(gpu_check.RUNNERS, "mask_predictor", fails)
    monkeypatch.setitem(gpu_check.RUNNERS, "igos_pp", overruns)
    monkeypatch.setitem(gpu_check.RUNNERS, "causal_metrics", lambda result, ctx: ran.append("causal_metrics"))
    gpu_check.main(["--out", str(tmp_path), "--sections", "environment,mask_predictor,igos_pp,causal_metrics",
                    "--budget", "5", "--device", "cpu", "--threads", "1", "--commit", "x"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"]["mask_predictor"] == "RuntimeError: out of memory (on purpose)"
    assert report["errors"]["igos_pp"].startswith("SectionTimeout: ran past its time box")
    assert report["igos_pp"]["batch_seconds"] == 1.0 and report["environment"]["torch"]
    assert ran == ["causal_metrics"] and set(report["errors"]) == {"mask_predictor", "igos_pp"}
    assert report["section_seconds"]["igos_pp"] < 10
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| errors | mask_predictor |  | RuntimeError: out of memory (on purpose) |" in markdown


def test_print_deps_lists_gpu_deps(capsys):
    gpu_check.main(["--print-deps"])
    assert capsys.readouterr().out.split() == list(gpu_check.GPU_DEPS)
    assert "gpu-check-deps:" in (ROOT / "Makefile").read_text()
    assert "--print-deps" in (ROOT / "Makefile").read_text()


def _model_args_and_precision(path: Path) -> tuple[dict, str | None]:
    """The model's init_args and the trainer precision a training config resolves to: its ``config:`` include
    first, then its ``model:`` (a file path relative to it, or a block), then its dotted keys."""
    data = yaml.safe_load(path.read_text())
    args, precision = _model_args_and_precision(path.parent / data["config"]) if "config" in data else ({}, None)
    model = data.get("model")
    if isinstance(model, str):
        model = yaml.safe_load((path.parent / model).read_text())
    if isinstance(model, dict):
        args.update(model.get("init_args") or {})
    trainer = data.get("trainer")
    if isinstance(trainer, dict) and "precision" in trainer:
        precision = trainer["precision"]
    args.update({key.removeprefix("model.init_args."): value for key, value in data.items()
                 if key.startswith("model.init_args.")})
    return args, data.get("trainer.precision", precision)


def test_embedded_recipe_is_the_game_config():
    """GAME_RECIPE is what configs/train/embedded_predictor_game.yaml trains."""
    args, precision = _model_args_and_precision(ROOT / "configs/train/embedded_predictor_game.yaml")
    recipe = dict(gpu_check.GAME_RECIPE)  # its loss terms: the same file, named from the checkout's root
    assert (ROOT / "configs/train" / args.pop("objectives")).resolve() == (ROOT / recipe.pop("objectives")).resolve()
    assert {key: args.get(key) for key in recipe} == recipe
    assert precision == "bf16-mixed"
