"""The embedded pipeline in one command (``make demo``): every stage writes under ``--out`` and is skipped
when its results are already there, so a re-run reuses finished stages and resumes an interrupted one.

Stages (each a plain ``train.py`` / ``evaluate.py`` call that you can also run by hand):
  1. classifier — the embedded black box: the committed record ``assets/embedded_blackbox.pt`` (made by
     this same pipeline, see assets/README.md) is tested on the embedded test split; with
     ``--train_classifier`` or without that file it is trained (configs/train/embedded_classifier.yaml);
  2. filter — the feature filter (class selector) of the mask predictors (embedded_filter.yaml);
  3. predictor_ct, predictor_bt, mgnet, predictor_game — the learned mask predictors (embedded_predictor_*.yaml,
     embedded_mgnet.yaml), trained with the filter frozen. predictor_game (the deletion/insertion game alone,
     embedded_predictor_game.yaml) does not fit the 30-minute budget beside the others: its committed checkpoint
     ``assets/embedded_predictor_game.ckpt`` (made by that config, see assets/README.md) is tested instead, as
     long as it records the black box the demo uses; ``--train_game`` (or another black box) trains it;
  4. evaluation — the baselines, iGOS++, I-GOS, IASSA and the trained predictors (also CT with post-hoc
     tuning) x every metric on the embedded test split (embedded_evaluate.yaml); evaluate.py itself skips
     finished (image, method) pairs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from saliency_lab.core.blackbox import read_blackbox_record
from saliency_lab.core.checkpoints import safe_load

CLASSIFIER_CONFIG = "configs/train/embedded_classifier.yaml"
FILTER_CONFIG = "configs/train/embedded_filter.yaml"
PREDICTOR_CONFIGS = {"predictor_ct": "configs/train/embedded_predictor_ct.yaml",
                     "predictor_bt": "configs/train/embedded_predictor_bt.yaml",
                     "mgnet": "configs/train/embedded_mgnet.yaml",
                     "predictor_game": "configs/train/embedded_predictor_game.yaml"}
EVALUATE_CONFIG = "configs/evaluate/embedded_evaluate.yaml"
CLI = (sys.executable, "-m", "saliency_lab.cli")  # the stages run as the saliency-lab command would
COMMITTED_BLACKBOX = Path("assets/embedded_blackbox.pt")
COMMITTED_GAME = Path("assets/embedded_predictor_game.ckpt")  # ~5.7 min of training the budget has no room for


def _call(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint (ModelCheckpoint keeps one, by the monitored metric) of a stage, else last.ckpt."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return ckpts[-1] if ckpts else run_dir / "checkpoints" / "last.ckpt"


def train_stage(config: str, run_dir: Path, extra: list[str] = (), checkpoint: Path | None = None) -> dict:
    """fit (resuming from last.ckpt when interrupted), then test the best checkpoint; with ``checkpoint`` (a
    committed one) only test that. A finished stage is reused; to be trained, it must have been trained (a folder
    that only tested a committed checkpoint is trained now).
    ``extra``: train.py arguments after the config (stage inputs, then the user's --train_args)."""
    trained = (run_dir / "fit_metrics.json").is_file()
    if (run_dir / "test_metrics.json").is_file() and (checkpoint is not None or trained):
        print(f"[demo] {run_dir.name}: finished earlier, reusing {run_dir}")
    else:
        base = ["--config", config, f"--run_dir={run_dir}", *extra]
        if checkpoint is None and not trained:
            resume = ["--ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []
            _call([*CLI, "fit", *base, *resume])
        _call([*CLI, "test", *base, f"--ckpt_path={checkpoint or best_checkpoint(run_dir)}"])
    return json.loads((run_dir / "test_metrics.json").read_text())


def game_checkpoint(checkpoint: Path, blackbox: Path) -> Path | None:
    """The predictor_game ``checkpoint`` to test instead of training it, or None: train it. A predictor explains
    the classifier it was trained on, so the checkpoint must record ``blackbox`` (the demo's black-box file).

    Raises:
        ValueError: a ``checkpoint`` the user gave (not the committed one) is missing or records another black box.
    """
    if checkpoint.is_file():
        explainer = safe_load(checkpoint).get("explainer") or {}
        recorded = explainer.get("blackbox") or {}
        spec = str((recorded.get("init_args") or {}).get("model", ""))
        kind, _, path = spec.partition(":")
        if explainer.get("name") != "predictor_game":  # another predictor would clash with the demo's own entry
            problem = f"{checkpoint} is a {explainer.get('name') or 'non-explainer'} checkpoint, not a predictor_game one"
        elif kind == "ckpt" and Path(path).resolve() == blackbox.resolve():
            return checkpoint
        else:
            problem = f"{checkpoint} was trained on the black box {spec or '(none recorded)'}, not on {blackbox}"
    else:
        problem = f"no such file {checkpoint}"
    if checkpoint != COMMITTED_GAME:
        raise ValueError(problem)
    print(f"[demo] predictor_game will be trained: {problem}")
    return None


def classifier_stage(out: Path, record: Path, train: bool, overrides: list[str]) -> tuple[float, Path]:
    """(test accuracy, black-box checkpoint): a black-box record, tested, or a freshly trained classifier."""
    run_dir = out / "classifier"
    if train or not record.is_file():
        accuracy = train_stage(CLASSIFIER_CONFIG, run_dir, overrides)["test/acc"]
        return accuracy, best_checkpoint(run_dir)
    if not (run_dir / "test_metrics.json").is_file():
        print(f"[demo] classifier: testing the black box {record} (train one anew: --train_classifier)")
        arch = read_blackbox_record(record)  # the record's architecture, whatever the config says
        blackbox = "--model.init_args.blackbox.init_args"
        _call([*CLI, "test", "--config", CLASSIFIER_CONFIG, f"--run_dir={run_dir}",
               f"{blackbox}.model={arch['model']}", f"{blackbox}.num_classes={arch['num_classes']}",
               f"{blackbox}.model_kwargs={json.dumps(arch['model_kwargs'])}",
               f"{blackbox}.mean={json.dumps(arch['mean'])}", f"{blackbox}.std={json.dumps(arch['std'])}",
               f"--model.init_args.weights={record}", *overrides])
    return json.loads((run_dir / "test_metrics.json").read_text())["test/acc"], record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for every stage's outputs")
    parser.add_argument("--num_images", type=int, default=None, help="images to evaluate (default: the config's)")
    parser.add_argument("--blackbox", type=Path, default=COMMITTED_BLACKBOX,
                        help="black-box record to use (default: the committed one; trained when missing)")
    parser.add_argument("--train_classifier", action="store_true",
                        help="train the black box even though the --blackbox record is there")
    parser.add_argument("--game_checkpoint", type=Path, default=COMMITTED_GAME,
                        help="predictor_game checkpoint to test and evaluate instead of training it (default: the "
                             "committed one, used when it records the demo's black box, else trained)")
    parser.add_argument("--train_game", action="store_true",
                        help="train predictor_game (about 5.7 min on 2 cores) instead of using --game_checkpoint")
    parser.add_argument("--train_args", default="", help="extra train.py arguments for every stage (quoted)")
    parser.add_argument("--evaluate_args", default="", help="extra evaluate.py arguments (quoted)")
    args = parser.parse_args(argv)
    if args.game_checkpoint != COMMITTED_GAME and not args.game_checkpoint.is_file():  # before any stage runs
        parser.error(f"--game_checkpoint: no such file {args.game_checkpoint}")
    overrides = shlex.split(args.train_args)
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        timings[stage] = round(time.perf_counter() - start, 1)
        return result

    accuracy, ckpt = timed("classifier", classifier_stage, args.out, args.blackbox,
                           args.train_classifier, overrides)
    print(f"\n[demo] embedded black box: test accuracy {accuracy:.2%} on the embedded test split")
    print(f"[demo] checkpoint: {ckpt}  (BlackBox('ckpt:{ckpt}'))\n")
    blackbox = f"--model.init_args.blackbox.init_args.model=ckpt:{ckpt}"

    filter_dir = args.out / "filter"
    timed("filter", train_stage, FILTER_CONFIG, filter_dir, [blackbox, *overrides])
    filter_ckpt = best_checkpoint(filter_dir)
    try:
        game = None if args.train_game else game_checkpoint(args.game_checkpoint, ckpt)
    except ValueError as err:
        parser.error(f"--game_checkpoint: {err}")
    committed = {"predictor_game": game} if game else {}
    predictors = {}
    for name, config in PREDICTOR_CONFIGS.items():
        run_dir = args.out / name
        checkpoint = committed.get(name)
        if checkpoint is not None and (run_dir / "fit_metrics.json").is_file():
            print(f"[demo] {name}: trained earlier into {run_dir} (--train_game), reusing that instead of {checkpoint}")
            checkpoint = None
        timed(name, train_stage, config, run_dir,
              [blackbox, f"--model.init_args.filter_checkpoint={filter_ckpt}", *overrides], checkpoint)
        predictors[name] = checkpoint or best_checkpoint(run_dir)

    evaluation = args.out / "evaluation"
    extra = [] if args.num_images is None else [f"--num_images={args.num_images}"]
    ckpts = [str(path) for path in predictors.values()]
    ckpts.append(f"predictor_ct_posthoc={predictors['predictor_ct']}")  # CT with post-hoc tuning, same weights
    timed("evaluation", _call, [*CLI, "evaluate", "--config", EVALUATE_CONFIG, f"--blackbox.init_args.model=ckpt:{ckpt}",
                                f"--out={evaluation}", f"--ckpt_path={json.dumps(ckpts)}", *extra,
                                *shlex.split(args.evaluate_args)])

    (args.out / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"[demo] black box test accuracy {accuracy:.2%}; checkpoint {ckpt}")
    print(f"[demo] predictors: " + ", ".join(f"{n} {p}" for n, p in predictors.items()))
    print(f"[demo] evaluation: {evaluation}/summary.md, results.json, results.csv, curves.png, overlays.png")
    print(f"[demo] stage seconds this run: {timings} (total {sum(timings.values()):.0f} s)")


if __name__ == "__main__":
    main()
