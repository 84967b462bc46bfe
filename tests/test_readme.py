"""The README's task blocks, run as a user would type them: each ``bash`` block of the sections "1." to "3." is
read from README.md, its lines joined and split like a shell, ``saliency-lab`` replaced by this interpreter's
``-m saliency_lab.cli``, and run with tiny settings appended (later flags override earlier ones). The demo block's
run is tests/test_demo.py's (the demo is the slowest run of the suite); here its command is checked against the
Makefile and its files against that run."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "saliency_lab.cli"]


def task_section(number: int) -> str:
    """The text of the README section headed ``## N. ...``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {number}\. .*?(?=^## )", text, flags=re.S | re.M)
    assert match, f"README.md has no section '## {number}. ...'"
    return match.group(0)


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M)


def commands(block: str, env: dict[str, str]) -> list[list[str]]:
    """Shell lines of a block (continuations joined, comments dropped, $VARS from ``env``) as argument lists."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        for name, value in env.items():
            line = line.replace(f"${name}", value)
        words = shlex.split(line, comments=True)
        if words:
            lines.append(words)
    return lines


def as_cli(words: list[str]) -> list[str]:
    assert words[0] == "saliency-lab", f"a README command that is not saliency-lab: {words}"
    return [*CLI, *words[1:]]


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# --- 1. the demo -----------------------------------------------------------------------------------------------

def demo_block_files() -> list[str]:
    """The files the demo block opens (``cat``/``xdg-open``), relative to the demo's --out."""
    (block,) = code_blocks(task_section(1), "bash")
    lines = commands(block, {})
    assert lines[0] == ["make", "demo"], lines[0]
    opened = [words[1] for words in lines[1:] if words[0] in ("cat", "xdg-open")]
    assert opened and all(path.startswith("outputs/demo/") for path in opened), opened
    return [path.removeprefix("outputs/demo/") for path in opened]


def test_the_demo_block_is_the_makefile_demo():
    """``make demo`` runs ``saliency-lab demo --out outputs/demo``: the command tests/test_demo.py runs with tiny
    settings, where the files this block opens are checked (:func:`demo_block_files`)."""
    recipe = re.search(r"^demo:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert shlex.split(recipe)[1:] == ["demo", "--out", "outputs/demo"], recipe
    assert shlex.split(recipe)[0].endswith("/bin/saliency-lab")
    assert set(demo_block_files()) == {"evaluation/summary.md", "evaluation/report.html"}


# --- 2. your own model and images ------------------------------------------------------------------------------

MY_NET = '''
import torch
from torch import nn


class MyNet(nn.Module):
    """A user's classifier: its own stem, four stages named layer1..layer4 and a head; 10 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(x.mean((2, 3)))
'''


@pytest.fixture
def user_folder(tmp_path):
    """What the block assumes: my_photos/ with images of any size, my_package/models.py with MyNet, my_net.pt."""
    import numpy as np
    from PIL import Image

    photos = tmp_path / "my_photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, size in [("cat.png", (80, 60)), ("street.jpg", (50, 70))]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(photos / name)
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MY_NET)
    sys.path.insert(0, str(tmp_path))
    try:
        from my_package.models import MyNet
        torch.manual_seed(0)
        torch.save(MyNet().state_dict(), tmp_path / "my_net.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_package.models", None)
        sys.modules.pop("my_package", None)
    return tmp_path


@pytest.mark.slow
def test_the_explain_block_on_a_user_model_and_folder(user_folder):
    (block,) = code_blocks(task_section(2), "bash")
    lines = commands(block, {})
    assert len(lines) == 2 and all(words[:2] == ["saliency-lab", "explain"] for words in lines), lines
    env = subprocess_env()
    env["PYTHONPATH"] = str(user_folder) + os.pathsep + env["PYTHONPATH"]  # my_package is the user's
    tiny = {"rise": ["--method_hparams", "{n_masks: 32}", "--image_size", "64"], "gradcam": []}
    for words in lines:
        method = words[words.index("--method") + 1]
        run([*as_cli(words), *tiny[method]], cwd=user_folder, env=env)
        out = user_folder / words[words.index("--out") + 1]
        for name in ("cat.png", "street.jpg"):
            for suffix in (".map.png", ".map.npy", ".overlay.png"):
                assert (out / f"{name}{suffix}").is_file(), (method, name, suffix)
        index = (out / "index.jsonl").read_text().splitlines()
        assert len(index) == 2, index
    import numpy as np

    rise_map = np.load(user_folder / "my_maps_rise" / "cat.png.map.npy")
    assert rise_map.shape[-2:] == (60, 80) and np.isfinite(rise_map).all() and rise_map.std() > 0


# --- 3. ImageNet on a cluster ----------------------------------------------------------------------------------

SIZE = 32
TINY_FIT = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            f"--data.init_args.image_size={SIZE}", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
            "--model.init_args.blackbox.init_args.num_classes=10"]
TINY_EVALUATE = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", f"--data.init_args.image_size={SIZE}",
                 "--data.init_args.num_workers=0", "--blackbox.init_args.num_classes=10", "--num_images=2",
                 "--batch_size=2", "--explainers=[gradcam, {name: rise, n_masks: 16}]", "--settings.mf_steps=4",
                 "--wandb=false", "--overlay_images=2"]


@pytest.mark.slow
def test_the_cluster_block_on_an_exported_imagenet_folder(tmp_path):
    """The three stages as written (filter, CT predictor reading the filter's checkpoint, evaluation reading the
    predictor's), on the embedded scenes exported as an ImageNet folder (10 classes, 32 px) with a random-weight
    ResNet-50 file under the configs' file name in the folder the block exports as SALIENCY_LAB_WEIGHTS, on the
    CPU, with tiny settings appended; run from a folder outside the checkout, so the configs come from the
    package."""
    from torchvision.models import resnet50

    from saliency_lab.datamodules.scene_export import export_imagenet

    imagenet = export_imagenet(tmp_path / "imagenet", {"train": 16, "val": 8}, image_size=SIZE)
    torch.manual_seed(0)
    weights = tmp_path / "weights"  # the folder the block exports; the configs name the file in it
    weights.mkdir()
    torch.save(resnet50(num_classes=10).state_dict(), weights / "resnet50-0676ba61.pth")
    work = tmp_path / "work"
    work.mkdir()
    (block,) = code_blocks(task_section(3), "bash")
    exports, *lines = commands(block, {"IMAGENET": str(imagenet)})
    assert exports[0] == "export" and exports[1].partition("=")[0] == "SALIENCY_LAB_WEIGHTS", exports
    env = {**subprocess_env(), "SALIENCY_LAB_WEIGHTS": str(weights)}
    assert [words[:2] for words in lines] == [["saliency-lab", "fit"]] * 2 + [["saliency-lab", "evaluate"]], lines
    stages = [w[w.index("--config") + 1] for w in lines]
    assert stages == ["configs/train/imagenet_resnet50_filter.yaml", "configs/train/imagenet_resnet50_ct.yaml",
                      "configs/evaluate/imagenet_resnet50.yaml"]
    for words in lines[:2]:
        run([*as_cli(words), *TINY_FIT], cwd=work, env=env)
    for run_dir in ("resnet50_filter", "resnet50_ct"):
        assert (work / "outputs/imagenet" / run_dir / "checkpoints/last.ckpt").is_file(), run_dir
    run([*as_cli(lines[2]), *TINY_EVALUATE], cwd=work, env=env)
    import json

    results = json.loads((work / "outputs/imagenet/resnet50_evaluation/results.json").read_text())
    assert {"gradcam", "rise"} <= set(results["methods"]) and len(results["methods"]) == 3, results["methods"]
    assert all(stats["images"] == 2 for stats in results["methods"].values())


def test_make_test_also_runs_the_metric_and_conformance_tests_on_an_emulated_plain_cpu():
    """CI runs ``make test``; its recipe ends with ``make test-emulated-cpu``, which runs the explainer conformance
    and metric tests again with ATen's scalar kernels and oneDNN capped at AVX2 (a CPU without AVX-512 or bf16)."""
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    assert "test-emulated-cpu" in test_recipe.splitlines()[-1]
    emulated = re.search(r"^test-emulated-cpu:.*\n\t(.*)$", makefile, flags=re.M).group(1)
    assert "ATEN_CPU_CAPABILITY=default" in emulated and "ONEDNN_MAX_CPU_ISA=AVX2" in emulated
    listed = re.search(r"^EMULATED_TESTS := (.*)$", makefile, flags=re.M).group(1)
    assert "tests/test_explainers_conformance.py" in listed and "tests/test_metrics_*.py" in listed
