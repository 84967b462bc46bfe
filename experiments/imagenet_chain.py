"""The ImageNet recipe end to end at ImageNet geometry on a CPU, before anyone pays for GPUs.

    python -m experiments.imagenet_chain --cnn resnet50 [--train_images 8 --val_images 4 --image_size 224]
        [--processes 2] [--epochs 2] [--eval_images 2] [--methods tiny|default] [--steps 8] [--out DIR]

The embedded scenes are exported in the ImageNet folder layout (``saliency-lab export-scenes``) at
``--image_size``; the CNN (``resnet50`` as ``timm:resnet50``, ``vgg19`` / ``googlenet`` from torchvision) is built
without pretrained weights, a random 10-class state dict standing in for the weights file its
``configs/blackbox/CNN.yaml`` names (found through ``SALIENCY_LAB_WEIGHTS``). Then the three stages run as
docs/cluster.md writes them, each a ``saliency-lab`` subprocess with ``--processes`` DDP processes (gloo) from a
folder outside the checkout:

1. the filter config (``configs/train/imagenet_resnet50_filter.yaml`` for ResNet-50), one epoch;
2. the CT config (``configs/train/imagenet_resnet50_ct.yaml``) reading stage 1's checkpoint, ``--epochs`` epochs;
   with ``--kill_and_resume`` (default on) it is SIGKILLed once ``last.ckpt`` holds the end of its first epoch,
   and restarted with ``--ckpt_path last``;
3. the evaluation config (``configs/evaluate/imagenet_resnet50.yaml``): RISE, iGOS++, IASSA and the stage-2
   predictor on the first ``--eval_images`` validation images, every metric, the causal protocol ``rise`` with
   ``--steps`` steps.

Only the probe-set callbacks of the training configs are replaced (``--trainer.callbacks`` keeps the checkpoint
ones): at 224 px they cost minutes per validation on a CPU, and they run at small sizes in the tests.
``--methods tiny`` (the test's) runs one iteration of each costly method; ``default`` their registry defaults.
Writes ``OUT/chain.json`` and ``OUT/chain.md`` (seconds per stage, the evaluation's summary) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from saliency_lab.core.files import atomic_write, atomic_write_json
from saliency_lab.core.machine import describe, load_average

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "saliency_lab" / "configs"
NUM_CLASSES = 10  # the embedded scenes' classes
CNNS = {"resnet50": "timm:resnet50", "vgg19": "torchvision:vgg19", "googlenet": "torchvision:googlenet"}
METHODS = {
    "tiny": "[{name: rise, n_masks: 8}, {name: igos_pp, iterations: 1, ig_steps: 1}, "
            "{name: iassa, iterations: 1, window: 112, stride: 112}]",
    "default": "[rise, igos_pp, iassa]",
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "saliency_lab.cli", *args]


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 7200) -> subprocess.CompletedProcess:
    """Run ``cmd``; a non-zero exit raises with the command and the ends of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def random_weights_file(cnn: str, folder: Path) -> Path:
    """A random-weight 10-class ``cnn`` saved under the file name configs/blackbox/<cnn>.yaml names."""
    from saliency_lab.core.blackbox import create_network

    name = yaml.safe_load((CONFIGS / "blackbox" / f"{cnn}.yaml").read_text())["init_args"]["weights"]
    if Path(name).is_absolute():
        raise ValueError(f"configs/blackbox/{cnn}.yaml hard-codes a weights location: {name}")
    torch.manual_seed(0)
    path = folder / name
    torch.save(create_network(CNNS[cnn], NUM_CLASSES).state_dict(), path)
    return path


def trainer_args(processes: int) -> list[str]:
    strategy = "ddp" if processes > 1 else "auto"
    return ["--trainer.accelerator=cpu", f"--trainer.devices={processes}", f"--trainer.strategy={strategy}",
            "--trainer.precision=32-true"]


def fit_args(cnn: str, stage: str, imagenet: Path, processes: int, epochs: int) -> list[str]:
    callbacks = ", ".join(str(CONFIGS / "callbacks" / name)
                          for name in ("checkpoint_epochs.yaml", "checkpoint_resume_imagenet.yaml"))
    return ["fit", "--config", f"configs/train/imagenet_{cnn}_{stage}.yaml", f"--data.init_args.root={imagenet}",
            *trainer_args(processes), "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
            f"--trainer.callbacks=[{callbacks}]", "--trainer.num_sanity_val_steps=0",
            "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=1", f"--trainer.max_epochs={epochs}",
            f"--model.init_args.blackbox.init_args.model={CNNS[cnn]}",
            f"--model.init_args.blackbox.init_args.num_classes={NUM_CLASSES}"]


def evaluate_args(cnn: str, imagenet: Path, predictor: Path, out: Path, processes: int, images: int,
                  methods: str, steps: int) -> list[str]:
    return ["evaluate", "--config", f"configs/evaluate/imagenet_{cnn}.yaml", f"--data.init_args.root={imagenet}",
            f"--ckpt_path=[{predictor}]", *trainer_args(processes), "--data.init_args.num_workers=0",
            f"--blackbox.init_args.model={CNNS[cnn]}", f"--blackbox.init_args.num_classes={NUM_CLASSES}",
            f"--num_images={images}", "--batch_size=1", f"--explainers={METHODS[methods]}",
            f"--settings.protocol={{preset: rise, steps: {steps}}}", "--settings.mf_steps=4",
            "--settings.road_fractions=[0.5]", "--wandb=false", f"--overlay_images={min(images, 4)}", f"--out={out}"]


def last_checkpoint_at(checkpoints: Path, step: int) -> bool:
    """Whether ``checkpoints/last.ckpt`` is complete and holds global step ``step`` (what ``--ckpt_path last``
    resumes from); a file still being written does not load."""
    try:
        return torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == step
    except Exception:
        return False


def kill_once_saved(cmd: list[str], cwd: Path, env: dict, checkpoints: Path, step: int,
                    timeout: float = 7200) -> bool:
    """Start ``cmd`` in its own process group and SIGKILL the group (every DDP process) once ``last.ckpt`` holds
    global step ``step``; True if it was killed, False if it ended first."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not last_checkpoint_at(checkpoints, step) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    ended = proc.poll() is not None
    if not ended:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not ended


def run_chain(cnn: str, imagenet: Path, work: Path, env: dict, *, processes: int = 2, epochs: int = 2,
              kill_and_resume: bool = True, eval_images: int = 2, methods: str = "tiny", steps: int = 8) -> dict:
    """The three stages in ``work`` (their runs under ``work/outputs/imagenet``); returns the seconds of each
    stage, the checkpoints and the evaluation folder. ``env`` must hold ``SALIENCY_LAB_WEIGHTS``."""
    runs = work / "outputs" / "imagenet"
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    run(cli(*fit_args(cnn, "filter", imagenet, processes, 1)), work, env)
    seconds["filter"] = time.perf_counter() - start

    predictor = fit_args(cnn, "ct", imagenet, processes, epochs)
    checkpoints = runs / f"{cnn}_ct" / "checkpoints"
    start = time.perf_counter()
    killed, resumed_log = False, ""
    if kill_and_resume and epochs > 1:
        killed = kill_once_saved(cli(*predictor), work, env, checkpoints, steps_per_epoch(imagenet, processes))
        resumed = run(cli(*predictor, "--ckpt_path=last"), work, env)
        resumed_log = resumed.stdout + resumed.stderr
    else:
        run(cli(*predictor), work, env)
    seconds["predictor"] = time.perf_counter() - start

    out = runs / f"{cnn}_evaluation"
    start = time.perf_counter()
    run(cli(*evaluate_args(cnn, imagenet, checkpoints / "last.ckpt", out, processes, eval_images, methods, steps)),
        work, env)
    seconds["evaluate"] = time.perf_counter() - start
    return {"cnn": cnn, "seconds": seconds, "killed": killed, "resumed_log": resumed_log,
            "filter_checkpoint": runs / f"{cnn}_filter" / "checkpoints" / "last.ckpt",
            "checkpoints": checkpoints, "evaluation": out, "steps_per_epoch": steps_per_epoch(imagenet, processes)}


def steps_per_epoch(imagenet: Path, processes: int, batch_size: int = 2) -> int:
    """Training steps of one epoch per process: the training images split over the processes, in batches."""
    images = sum(1 for _ in (imagenet / "train").glob("*/*"))
    per_process = -(-images // processes)
    return -(-per_process // batch_size)


def summary_table(result: dict, command: str) -> str:
    summary = json.loads((result["evaluation"] / "results.json").read_text())["methods"]
    info = describe()
    lines = [f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, CPU capability {info['cpu_capability']}, "
             f"torch {info['torch']}, {load_average()}. Command: `{command}`.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {value:.1f} |" for stage, value in result["seconds"].items()]
    lines += ["", "| method | images | deletion | insertion | seconds / image |", "|---|---|---|---|---|"]
    for name, stats in summary.items():
        deletion, insertion, seconds = (stats.get(key, float("nan")) for key in
                                        ("deletion", "insertion", "seconds_per_image"))
        lines.append(f"| {name} | {stats.get('images')} | {deletion:.3f} | {insertion:.3f} | {seconds:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cnn", choices=sorted(CNNS), default="resnet50")
    parser.add_argument("--train_images", type=int, default=8)
    parser.add_argument("--val_images", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kill_and_resume", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--eval_images", type=int, default=2)
    parser.add_argument("--methods", choices=sorted(METHODS), default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="steps of the causal curves (rise preset)")
    parser.add_argument("--out", type=Path, default=Path("outputs/imagenet_chain"))
    args = parser.parse_args(argv)
    from saliency_lab.datamodules.scene_export import export_imagenet

    out = args.out.resolve()
    (out / "weights").mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(exist_ok=True)
    imagenet = export_imagenet(out / "imagenet", {"train": args.train_images, "val": args.val_images},
                               image_size=args.image_size)
    random_weights_file(args.cnn, out / "weights")
    env = {**os.environ, "SALIENCY_LAB_WEIGHTS": str(out / "weights"), "WANDB_MODE": "disabled"}
    result = run_chain(args.cnn, imagenet, out / "work", env, processes=args.processes, epochs=args.epochs,
                       kill_and_resume=args.kill_and_resume, eval_images=args.eval_images, methods=args.methods,
                       steps=args.steps)
    command = shlex.join(["python", "-m", "experiments.imagenet_chain", *(sys.argv[1:] if argv is None else argv)])
    table = summary_table(result, command)
    atomic_write(out / "chain.md", table)
    atomic_write_json(out / "chain.json", {k: str(v) if isinstance(v, Path) else v for k, v in result.items()})
    print(table)
    return result


if __name__ == "__main__":
    main()
