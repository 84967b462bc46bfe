"""The shipped configs: every configs/train/*.yaml parses with the training CLI's parser and every
configs/evaluate/*.yaml with evaluate's (parsed only: nothing is built, no weights are read), each command refuses
the other's configs, and the ImageNet recipe is composed: one black-box file per CNN, one data file, one trainer."""
from __future__ import annotations

import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest
import yaml

from saliency_lab.cli import evaluate, train
from saliency_lab.cli.main import run
from saliency_lab.cli.utils import SaliencyCLI
from saliency_lab.core.blackbox import CLASS_PATH
from saliency_lab.core.resources import packaged
from tests.conftest import ROOT, subprocess_env

CONFIGS = ROOT / "configs"
TRAIN = sorted(p.name for p in (CONFIGS / "train").glob("*.yaml"))
EVALUATE = sorted(p.name for p in (CONFIGS / "evaluate").glob("*.yaml"))
ABLATION = sorted(p.name for p in (CONFIGS / "train" / "ablation").glob("*.yaml"))
CNNS = {"resnet50": "resnet50-0676ba61.pth", "vgg19": "vgg19-dcbb9e9d.pth", "googlenet": "googlenet-1378be20.pth"}
STAGES = ("filter", "ct", "bt", "mgnet", "game")


class _ParseOnly(SaliencyCLI):
    """The training CLI up to its parsed config: no seeding, no run folder, nothing instantiated."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def train_config(name: str, *overrides: str):
    """The training CLI's parse of configs/train/NAME (its includes resolved), as ``--print_config`` shows it."""
    with unittest.mock.patch.object(sys, "argv", ["train.py"]):  # pytest's own arguments are not train.py's
        return _ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False,
                          args=["--config", str(CONFIGS / "train" / name), *overrides]).config


def evaluate_config(name: str, *overrides: str):
    return evaluate.build_parser().parse_args(["--config", str(CONFIGS / "evaluate" / name), *overrides])


def test_the_recipe_has_every_file():
    assert {f"imagenet_{cnn}_{stage}.yaml" for cnn in CNNS for stage in STAGES} <= set(TRAIN)
    assert {f"imagenet_{cnn}.yaml" for cnn in CNNS} <= set(EVALUATE)
    assert {"embedded_predictor_game.yaml", "embedded_filter.yaml", "embedded_classifier.yaml"} <= set(TRAIN)
    assert {"embedded_evaluate.yaml", "coco_iassa.yaml", "embedded_coco_iassa.yaml"} <= set(EVALUATE)
    assert not (CONFIGS / "experiment").exists()
    assert {p.stem for p in (CONFIGS / "blackbox").glob("*.yaml")} == {"embedded", *CNNS}


@pytest.mark.parametrize("name", TRAIN)
def test_every_training_config_parses_with_the_training_parser(name):
    cfg = train_config(name)
    assert cfg.model.class_path.startswith("saliency_lab.lightning_modules.") and cfg.run_dir
    assert cfg.data.class_path.startswith("saliency_lab.datamodules.") and cfg.seed_everything == 0
    assert cfg.trainer.logger.init_args.name == Path(name).stem  # the W&B run is named after its config
    assert cfg.trainer.accelerator == "auto"  # a GPU where one is visible; the overlays (trainer/*_ddp) pick one
    if name.startswith("imagenet_"):
        cnn = name.split("_")[1]
        assert cfg.model.init_args.blackbox.init_args.model == f"torchvision:{cnn}"
        assert cfg.model.init_args.blackbox.init_args.weights == CNNS[cnn]
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("auto", "auto", "auto")
        assert cfg.run_dir == f"outputs/imagenet/{Path(name).stem.removeprefix('imagenet_')}"


def test_every_ablation_variant_parses_and_builds_its_loss_terms():
    """experiments/predictor_ablation.py's variants (configs/train/ablation/): each parses with the training parser
    and its loss terms build (the teacher's maps file is made by the driver, so the Teacher term is only resolved)."""
    from saliency_lab.lightning_modules.objectives import Teacher, build_objective

    assert len(ABLATION) >= 20 and {"lever_game.yaml", "lever_rise.yaml", "lever_shap.yaml"} <= set(ABLATION)
    for name in ABLATION:
        cfg = train_config(f"ablation/{name}")
        assert cfg.model.class_path == "saliency_lab.lightning_modules.mask_predictor.MaskPredictor", name
        for term in cfg.model.init_args.objectives or []:
            spec = {"class_path": term.class_path, "init_args": term.init_args.as_dict()}
            if term.class_path.endswith(".Teacher"):
                assert set(spec["init_args"]) >= {"maps"}, name
                continue
            assert not isinstance(build_objective(spec), Teacher), name


@pytest.mark.parametrize("name", EVALUATE)
def test_every_evaluate_config_parses_with_the_evaluate_parser(name):
    cfg = evaluate_config(name)
    assert cfg.blackbox.class_path == CLASS_PATH and cfg.blackbox.init_args.model
    assert cfg.trainer.accelerator == "auto" and evaluate.explainer_specs(cfg)
    if name.startswith("imagenet_"):
        cnn = Path(name).stem.removeprefix("imagenet_")
        assert (cfg.blackbox.init_args.model, cfg.blackbox.init_args.weights) == (f"torchvision:{cnn}", CNNS[cnn])
        assert cfg.split == "val" and cfg.out == f"outputs/imagenet/{cnn}_evaluation"
        names = {spec if isinstance(spec, str) else spec["name"] for spec in cfg.explainers}
        assert names == {"rise", "gradient", "integrated_gradients", "gradcam", "gradcam_pp", "igos_pp", "iassa"}


@pytest.mark.parametrize("cnn", CNNS)
def test_each_predictor_reads_the_filter_its_filter_config_writes(cnn):
    filter_run = train_config(f"imagenet_{cnn}_filter.yaml").run_dir
    for stage in ("ct", "bt", "mgnet", "game"):
        cfg = train_config(f"imagenet_{cnn}_{stage}.yaml")
        assert cfg.model.init_args.filter_checkpoint == f"{filter_run}/checkpoints/last.ckpt", stage
        assert cfg.model.init_args.mode == ("mgnet" if stage == "mgnet" else "bt" if stage == "bt" else "ct")
        assert (cfg.trainer.max_epochs, cfg.model.init_args.lr, cfg.model.init_args.lr_step_epochs) == (10, 0.01, 3)


def test_the_gpu_overlay_keeps_each_commands_precision():
    """configs/trainer/gpu_ddp.yaml on top: DDP on every GPU; training keeps bf16, evaluation its 32-true."""
    overlay = ["--trainer", str(CONFIGS / "trainer" / "gpu_ddp.yaml")]
    cfg = train_config("imagenet_resnet50_ct.yaml", *overlay)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("gpu", -1, "ddp")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.logger.init_args.name == "imagenet_resnet50_ct"
    cfg = evaluate_config("imagenet_resnet50.yaml", *overlay)
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, cfg.trainer.precision) == ("gpu", "ddp", "32-true")


def _yaml_files():
    return sorted(packaged("configs").rglob("*.yaml"))


def _blackbox_blocks(value):
    """Every mapping with the BlackBox class path in a parsed YAML value."""
    if isinstance(value, dict):
        if value.get("class_path") == CLASS_PATH:
            yield value
        for item in value.values():
            yield from _blackbox_blocks(item)
    elif isinstance(value, list):
        for item in value:
            yield from _blackbox_blocks(item)


def test_each_imagenet_black_box_is_described_once_in_its_own_file():
    """No config outside configs/blackbox/ describes torchvision's ResNet-50, VGG-19 or GoogLeNet, as a block or as
    a dotted key: the others include configs/blackbox/X.yaml."""
    found = {}
    for path in _yaml_files():
        where = path.relative_to(packaged("configs")).as_posix()
        for block in _blackbox_blocks(yaml.safe_load(path.read_text())):
            found.setdefault((block.get("init_args") or {}).get("model"), []).append(where)
        values = [line.split("#", 1)[0] for line in path.read_text().splitlines()]  # comments may name them
        if not where.startswith("blackbox/"):
            assert not [line for line in values if "torchvision:" in line], where
    assert {model: found.get(model) for model in (f"torchvision:{cnn}" for cnn in CNNS)} == {
        f"torchvision:{cnn}": [f"blackbox/{cnn}.yaml"] for cnn in CNNS}


def test_the_imagenet_configs_include_the_shared_files_by_path():
    """Composition, not copies: the black box, the data and the trainer are included by relative path; the data
    loader's worker count is set once, in the data file."""
    for cnn in CNNS:
        for name in [*(f"train/imagenet_{cnn}_{s}.yaml" for s in STAGES if s != "game"), f"evaluate/imagenet_{cnn}.yaml"]:
            raw = yaml.safe_load((CONFIGS / name).read_text())
            blackbox = raw["blackbox"] if name.startswith("evaluate") else raw["model"]["init_args"]["blackbox"]
            assert (blackbox, raw["data"], raw["config"]) == (f"../blackbox/{cnn}.yaml", "../data/imagenet.yaml",
                                                             "base/imagenet.yaml"), name
        assert yaml.safe_load((CONFIGS / f"train/imagenet_{cnn}_game.yaml").read_text())["config"] == f"imagenet_{cnn}_ct.yaml"
    assert yaml.safe_load((CONFIGS / "train/base/imagenet.yaml").read_text())["trainer"] == "../../trainer/imagenet.yaml"
    workers = [p.relative_to(packaged("configs")).as_posix() for p in _yaml_files()
               if "imagenet" in p.name and "num_workers" in p.read_text()]
    assert workers == ["data/imagenet.yaml"]


def test_no_config_names_a_fixed_weights_folder():
    assert [p.name for p in _yaml_files() if "/data/weights" in p.read_text()] == []


WRONG = [("fit", "evaluate/imagenet_resnet50.yaml", "saliency-lab evaluate --config"),
         ("validate", "evaluate/embedded_evaluate.yaml", "saliency-lab evaluate --config"),
         ("test", "evaluate/coco_iassa.yaml", "saliency-lab evaluate --config"),
         ("predict", "evaluate/imagenet_vgg19.yaml", "saliency-lab evaluate --config"),
         ("evaluate", "train/imagenet_resnet50_ct.yaml", "saliency-lab fit --config"),
         ("evaluate", "train/embedded_predictor_game.yaml", "saliency-lab fit --config")]


@pytest.mark.parametrize("command, name, right", WRONG)
def test_a_config_of_the_other_command_is_refused_at_once(command, name, right, monkeypatch, repo_root):
    """Before anything is parsed or built: the message names the file and the command that reads it, for the
    checkout's path, the --config=PATH spelling and the installed package's copy."""
    monkeypatch.chdir(repo_root)
    for given in (f"configs/{name}", str(packaged(f"configs/{name}"))):
        for args in (["--config", given], [f"--config={given}"]):
            with pytest.raises(SystemExit) as refused:
                if command == "evaluate":
                    evaluate.main(args)
                else:
                    train.main([command, *args])
            message = str(refused.value)
            assert given in message and f"{right} {given}" in message, message


def test_the_console_command_exits_with_the_message(repo_root):
    proc = subprocess.run([sys.executable, "-m", "saliency_lab.cli", "fit", "--config",
                           "configs/evaluate/imagenet_resnet50.yaml"], cwd=repo_root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "configs/evaluate/imagenet_resnet50.yaml is an evaluation config" in proc.stderr
    assert "saliency-lab evaluate --config configs/evaluate/imagenet_resnet50.yaml" in proc.stderr


def test_packaged_config_values_resolve_outside_the_checkout(tmp_path, monkeypatch):
    """--config and any option naming a configs/ file fall back to the installed package's copy."""
    from saliency_lab.core.resources import resolve_config_args

    monkeypatch.chdir(tmp_path)
    args = resolve_config_args(["--config", "configs/train/embedded_predictor_ct.yaml",
                                "--model.init_args.objectives", "configs/objectives/game.yaml",
                                "--model.init_args.objectives=configs/objectives/game.yaml", "--trainer.max_epochs=1"])
    game = str(packaged("configs/objectives/game.yaml"))
    assert args == [
        "--config", str(packaged("configs/train/embedded_predictor_ct.yaml")), "--model.init_args.objectives", game,
        f"--model.init_args.objectives={game}", "--trainer.max_epochs=1"]
    (tmp_path / "configs" / "objectives").mkdir(parents=True)
    (tmp_path / "configs" / "objectives" / "game.yaml").write_text("[]")  # your own file of that name wins
    assert resolve_config_args(["--x", "configs/objectives/game.yaml"])[1] == "configs/objectives/game.yaml"


def test_configs_elsewhere_pass_the_guard(tmp_path):
    """Your own config (any folder), the debug overlays and the embedded CLI entry are not refused by the guard."""
    from saliency_lab.core.resources import check_config_command, config_folder

    assert config_folder("configs/train/base/imagenet.yaml") == "train"
    assert config_folder(packaged("configs/evaluate/imagenet_resnet50.yaml")) == "evaluate"
    for path in ("configs/debug/tiny.yaml", str(tmp_path / "mine.yaml"), "my/train/x.yaml", "configs/train"):
        assert config_folder(path) is None, path
        check_config_command(path, "fit")
        check_config_command(path, "evaluate")
    with pytest.raises(SystemExit, match="saliency-lab evaluate --config"):
        run(["test", "--config", "configs/evaluate/imagenet_googlenet.yaml"])
