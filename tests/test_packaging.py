"""The package as a user gets it: a wheel built with ``python -m build``, installed into a fresh virtual environment,
used from a folder outside the repository (no checkout on the path): the Python API, ``saliency-lab explain`` with
the packaged embedded black box, and ``saliency-lab evaluate`` with a packaged config.

The fresh environment sees the project environment's site-packages through a ``.pth`` line (torch and the other
dependencies are not installed twice), but not its editable install of this checkout: ``saliency_lab`` comes from
the wheel, which the test asserts.
"""
from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from saliency_lab import __version__

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(repo_root, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(the fresh environment's bin folder, an environment without the checkout on any path, a work folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist")], repo_root, env)
    wheels = list((tmp / "dist").glob("saliency_lab-*.whl"))
    assert len(wheels) == 1 and wheels[0].name.startswith(f"saliency_lab-{__version__}-")
    names = zipfile.ZipFile(wheels[0]).namelist()
    for packaged in ("saliency_lab/py.typed", "saliency_lab/assets/embedded_blackbox.pt",
                     "saliency_lab/configs/evaluate/embedded_evaluate.yaml", "saliency_lab/configs/data/embedded.yaml"):
        assert packaged in names, packaged
    assert {name.split("/")[0] for name in names} <= {"saliency_lab", f"saliency_lab-{__version__}.dist-info"}

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the project environment's packages (torch, ...), without processing its .pth files (its editable install)
    (purelib / "project_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin", env, work


def readme_python_block(repo_root: Path) -> str:
    """The README's Python example (the block under "Explain your own model")."""
    text = (repo_root / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


def test_the_wheel_works_from_outside_the_checkout(installed, repo_root):
    bin_dir, env, work = installed
    python = str(bin_dir / "python")
    where = run([python, "-c", "import saliency_lab, sys; print(saliency_lab.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(bin_dir.parent)) and str(repo_root) not in where, where
    assert run([str(bin_dir / "saliency-lab"), "--version"], work, env).stdout.strip() == __version__

    # the README's Python example, as written
    (work / "example.py").write_text(readme_python_block(repo_root))
    run([python, "example.py"], work, env)
    assert (work / "overlay.png").stat().st_size > 5_000

    # saliency-lab explain on a folder of images, with the packaged embedded black box
    images = work / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(48, 40, 3, generator=generator) * 255).byte().numpy()
        Image.fromarray(pixels).save(images / f"photo{i}.png")
    run([str(bin_dir / "saliency-lab"), "explain", "--images", "images", "--out", "maps", "--method", "gradcam",
         "--blackbox", "embedded", "--image_size", "64", "--progress", "false"], work, env)
    index = [json.loads(line) for line in (work / "maps" / "index.jsonl").read_text().splitlines()]
    assert sorted(Path(row["file"]).name for row in index) == ["photo0.png", "photo1.png"]

    # saliency-lab evaluate with a config that ships with the package, on 2 images
    run([str(bin_dir / "saliency-lab"), "evaluate", "--config", "configs/evaluate/embedded_evaluate.yaml",
         "--explainers=gradient,gradcam", "--num_images=2", "--batch_size=2", "--wandb=false", "--out=evaluation",
         "--trainer.enable_progress_bar=false"], work, env)
    results = json.loads((work / "evaluation" / "results.json").read_text())
    assert set(results["methods"]) == {"gradient", "gradcam"}
    assert all(stats["images"] == 2 for stats in results["methods"].values())
