"""IASSA's performance against its number of iterations k on the embedded data: deletion, insertion, pointing
game, IoU and F1 (image level) and IoU / F1 at IASSA's "pixel level", every k paired against the default k.

    python -m experiments.iassa_iterations [--split test] [--num_images 16] [--iterations 1,2,3,5,10,15,25]
        [--default 5] [--stride S] [--window W] [--hparams JSON] [--presets rise[,igos]] [--road]
        [--batch_size 8] [--out outputs/iassa_iterations] [--table OUT/iassa_iterations.md] [--threads N]
        [--resamples 2000] [--report_only] [--dry_run] [--config EVALUATE.yaml] [--evaluate_args ...]

**The claim** (docs/methods.md §3): the IASSA paper runs k = 25 iterations (the released code 5) and studies
performance against k up to 25 with its metrics at the image and the pixel level: each iteration refines one
running Monte-Carlo estimate, so more iterations should not make the map worse. The metrics (docs/protocols.md):
deletion (lower is better) and insertion under the ``--presets`` protocols (default ``rise``, the paper's), the
pointing game (TorchRay's mean over classes), IoU and F1 of the map binarised at T = 0.3 (image level) and the
same divided by the binarised region's size (``iou_pixel``, ``f1_pixel``: IASSA's pixel-level table); M_I is
reported too. Deletion, insertion and the pointing game have no pixel-level variant.

**One run for every k.** Round k's windows and Monte-Carlo sums depend only on the rounds before it, never on the
total count, so the map after k rounds of a run with max(k) iterations *is* the map of a run with k iterations
(``IASSA.explain_with_snapshots``; tests/test_iassa.py checks it bit for bit, tests/test_iassa_iterations.py
checks it through evaluate.py). The driver explains every image once with max(k) iterations and writes each
snapshot, with its cost (passes, wall and CPU seconds up to round k of that run), into
``OUT/snapshots/iassa-kK`` in the layout of an ``evaluate.py --save_maps`` folder, keyed exactly as evaluate.py
keys the map of the spec ``{name: iassa, alias: iassa-kK, iterations: K, **overrides}``. Then every k is one
``evaluate.py`` run per preset (``frontier.evaluate_argv``) into ``OUT/settings/iassa-kK/PRESET`` that scores
those maps (``--maps_from``): the rows are the rows of a fresh k-iteration run. Every stage resumes: snapshots
already written are skipped, evaluate.py skips finished rows; a larger ``--num_images`` adds images.

``--stride``, ``--window`` and ``--hparams`` (JSON of any other IASSA hyper-parameters) apply to every k alike,
for a cheaper run. ROAD is not one of the paper's metrics and is skipped unless ``--road``.

**Paired intervals** (``frontier.paired_against_default`` for deletion / insertion and their normalised forms,
``metrics.report.paired_difference`` for the localisation metrics; the pointing game per image as a hit): per k
the mean over the images both explained of k − default with its 95% percentile-bootstrap interval; one inside
+-0.0005 (``igos_ablation.NEGLIGIBLE``; in the printed unit: +-0.05 for M_I in %, +-0.0005 x 10^-3 for the
pixel-level scores) counts as no difference.

Writes ``--table`` (markdown: the metrics per k and the paired intervals, headed by date, commit, CPU model and
the command) and ``OUT/iassa_iterations.json``, and prints the tables. Measured: docs/results/iassa_iterations.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
from pathlib import Path

import torch

from experiments import frontier
from experiments.frontier import LOWER_IS_BETTER, Setting, paired_against_default, setting_rows, summarise_setting
from experiments.igos_ablation import NEGLIGIBLE
from saliency_lab.metrics.suite import PER_MILLE_NAMES

ITERATIONS = (1, 2, 3, 5, 10, 15, 25)
DEFAULT_ITERATIONS = 5  # IASSA's default (the released code's): the reference of every paired interval
CAUSAL_KEYS = ("deletion", "insertion")
LOCALISATION_KEYS = ("pointing_game", "iou", "f1", "iou_pixel", "f1_pixel", "mi")


def label(k: int) -> str:
    return f"iassa-k{k}"


def plan(iterations: tuple[int, ...], default: int, overrides: dict) -> list[Setting]:
    """One frontier :class:`Setting` per k (the default first): spec ``{name: iassa, alias: iassa-kK,
    iterations: K, **overrides}``."""
    ks = sorted(set(iterations) | {default}, key=lambda k: (k != default, k))
    return [Setting("iassa", label(k), {"name": "iassa", "alias": label(k), **overrides, "iterations": k}, k == default)
            for k in ks]


def iterations_of(setting: Setting) -> int:
    return int(setting.spec["iterations"])


# ---------------------------------------------------------------------------------------------------------
# Stage 1: one explanation with max(k) iterations, every snapshot written as a --save_maps folder


def snapshot_folder(out: Path, setting: Setting) -> Path:
    return out / "snapshots" / setting.label


def write_snapshots(settings: list[Setting], args) -> None:
    """Explain the first ``--num_images`` images once with max(k) iterations and write each k's maps and costs
    into :func:`snapshot_folder` (images already there under the current key are skipped).

    The black box, data, split, seed, explained-class rule and keys come from evaluate.py's own parser and
    functions on the argv evaluate.py gets for the longest setting, so the keys are the ones it computes."""
    from saliency_lab.cli import evaluate
    from saliency_lab.cli.args import normalise_args
    from saliency_lab.cli.checks import validate_args
    from saliency_lab.core.files import atomic_write, atomic_write_json
    from saliency_lab.explainers import build_explainer
    from saliency_lab.metrics import RowStore, explained_class

    longest = max(settings, key=iterations_of)
    parser = evaluate.build_parser()
    cfg = parser.parse_args(normalise_args(frontier.evaluate_argv(longest, args.presets[0], args.out, args),
                                           command="evaluate"))
    validate_args(cfg)
    init = parser.instantiate(cfg)
    datamodule, blackbox = init.data, init.blackbox.eval()
    datamodule.prepare_data()
    datamodule.setup("test" if cfg.split == "test" else "validate")
    dataset = datamodule.dataset(cfg.split)
    num_images = min(args.num_images, len(dataset))
    image_size = int(dataset[0]["image"].shape[-1])
    common = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch}
    built = {s.label: build_explainer(s.spec, blackbox, **common) for s in settings}
    resolved = init.settings.resolve(image_size, target=cfg.target, max_forward_batch=cfg.max_forward_batch)
    data_record = {"name": type(datamodule).__name__, "split": cfg.split,
                   "init_args": evaluate._plain(cfg.data.init_args.as_dict())}
    passes = evaluate.pass_settings(blackbox, evaluate.evaluation_device(cfg.trainer.accelerator), cfg.trainer.precision)
    records = evaluate.method_records([s.label for s in settings], [s.spec for s in settings], built)
    keys, _ = evaluate.row_keys(records, blackbox.content_hash(), data_record,
                                evaluate._plain(resolved.to_dict(image_size)), passes)
    stores = {}
    for s in settings:
        folder = snapshot_folder(args.out, s)
        folder.mkdir(parents=True, exist_ok=True)
        # rows keyed by the explanation key: evaluate.py reads their costs through run.json's row_keys
        atomic_write_json(folder / "run.json", {"explanation_keys": {s.label: keys[s.label]},
                                                "row_keys": {s.label: keys[s.label]}, "methods": records[s.label],
                                                "num_images": num_images})
        stores[s.label] = RowStore(folder / "rows")
    done = set(range(num_images))
    for s in settings:
        done &= stores[s.label].finished({s.label: keys[s.label]}).get(s.label, set())
    todo = [i for i in range(num_images) if i not in done]
    explainer = built[longest.label]
    wanted = {iterations_of(s): s for s in settings}
    print(f"[iassa_iterations] snapshots k = {sorted(wanted)} from one {iterations_of(longest)}-iteration run: "
          f"{len(todo)} of {num_images} images to explain", flush=True)
    for start in range(0, len(todo), args.batch_size):
        part = todo[start:start + args.batch_size]
        samples = [dataset[i] for i in part]
        images = torch.stack([x["image"] for x in samples])
        labels = torch.as_tensor([int(x["label"]) for x in samples])
        indices = torch.as_tensor(part)
        targets = explained_class(blackbox, images, labels, cfg.target, resolved.protocol.max_forward_batch)
        maps, cost = explainer.explain_with_snapshots(images, targets, sorted(wanted), indices)
        for k, s in wanted.items():
            folder = snapshot_folder(args.out, s) / "maps" / s.label
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(part):
                saved = maps[k][j].detach().cpu().clone()
                atomic_write(folder / f"{i}.pt", lambda tmp, saved=saved: torch.save(saved, tmp))
            per_image = {name: value / len(part) for name, value in cost[k].items()}
            stores[s.label].append([{"index": i, "method": s.label, "key": keys[s.label], **per_image} for i in part])
        print(f"[iassa_iterations] explained {start + len(part)} / {len(todo)} "
              f"({cost[max(wanted)]['seconds'] / len(part):.1f} s per image)", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Stage 2: every k scored by evaluate.py


def run_setting(setting: Setting, args) -> None:
    """Score one k under every preset (frontier's evaluate.py arguments; the first preset reads the snapshot)."""
    from saliency_lab.cli import evaluate

    for preset in args.presets:
        argv = frontier.evaluate_argv(setting, preset, args.out, args)
        if preset == args.presets[0]:
            argv.append(f"--maps_from={snapshot_folder(args.out, setting)}")
        print(f"[iassa_iterations] {setting.label} / {preset}: python evaluate.py {shlex.join(argv)}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate.py prints its whole summary each time
            evaluate.main(argv)


# ---------------------------------------------------------------------------------------------------------
# Reading the results


def localisation_summary(rows: list[dict]) -> dict[str, float]:
    """Means of the localisation metrics over the rows (NaN left out); the pointing game as TorchRay reports it
    (``metrics.report.pointing_accuracy``: mean over classes)."""
    from saliency_lab.metrics.report import pointing_accuracy

    out = {}
    for key in LOCALISATION_KEYS:
        if key == "pointing_game":
            value = pointing_accuracy(rows)
            out[key] = math.nan if value is None else value
            continue
        values = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
        out[key] = sum(values) / len(values) if values else math.nan
    return out


def localisation_intervals(rows: list[dict], reference: list[dict], resamples: int) -> dict[str, dict[str, float]]:
    """key -> paired difference rows - reference (``metrics.report.paired_difference``) of the localisation
    metrics."""
    from saliency_lab.metrics.report import paired_difference

    both = [{**r, "method": "k"} for r in rows] + [{**r, "method": "default"} for r in reference]
    return paired_difference(both, "k", "default", keys=LOCALISATION_KEYS, resamples=resamples)


def collect(settings: list[Setting], args) -> dict[str, dict]:
    """label -> {"k", "rows", "summary" (frontier's and the localisation means), "intervals" (k - default:
    ``preset/key`` causal, plain ``key`` localisation)} for every k with rows on the first ``--num_images``."""
    result = {}
    for setting in settings:
        rows = setting_rows(setting, args.out, args.presets, args.num_images)
        if any(rows.values()):
            result[setting.label] = {"k": iterations_of(setting), "rows": rows,
                                     "summary": {**summarise_setting(rows),
                                                 **localisation_summary(rows[args.presets[0]])}}
    reference = result.get(label(args.default))
    for name, entry in result.items():
        if reference is None or name == label(args.default):
            entry["intervals"] = {}
            continue
        entry["intervals"] = {**paired_against_default(entry["rows"], reference["rows"], args.resamples),
                              **localisation_intervals(entry["rows"][args.presets[0]],
                                                       reference["rows"][args.presets[0]], args.resamples)}
    return result


def _f(value: float | None, digits: int = 3, scale: float = 1.0) -> str:
    return "–" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def _interval(stats: dict[str, float] | None, digits: int = 3, scale: float = 1.0) -> str:
    if stats is None:
        return "–"
    mean, low, high = (stats[k] * scale for k in ("mean", "low", "high"))
    text = f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    negligible = 0.5 * 10.0 ** -digits  # what prints as +-0.000 (+-0.0 for M_I) is no difference
    return f"**{text}**" if low > negligible or high < -negligible else text


def columns(presets: tuple[str, ...]) -> list[tuple[str, str]]:
    """(criterion, header) of every reported metric: the causal ones per preset, then the localisation ones."""
    causal = [(f"{p}/{k}", f"{k} ({p}) {'↓' if k in LOWER_IS_BETTER else '↑'}") for p in presets for k in CAUSAL_KEYS]
    names = {"pointing_game": "pointing game ↑", "iou": "IoU ↑", "f1": "F1 ↑", "iou_pixel": "IoU pixel ×10³ ↑",
             "f1_pixel": "F1 pixel ×10³ ↑", "mi": "M_I ↑"}
    return causal + [(k, names[k]) for k in LOCALISATION_KEYS]


def metrics_table(result: dict[str, dict], presets: tuple[str, ...], default: int) -> str:
    cols = columns(presets)
    lines = ["| k | images | passes / image | CPU s / image | " + " | ".join(h for _, h in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for entry in sorted(result.values(), key=lambda e: e["k"]):
        s = entry["summary"]
        k = f"{entry['k']} (default)" if entry["k"] == default else str(entry["k"])
        values = [_f(s[c], 1 if c == "mi" else 3, 1e3 if c in PER_MILLE_NAMES else 1.0) for c, _ in cols]
        lines.append(f"| {k} | {s['images']} | {s['passes']:.0f} | {_f(s['seconds'], 2)} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def interval_table(result: dict[str, dict], presets: tuple[str, ...], default: int) -> str:
    cols = columns(presets)
    lines = ["| k − default | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    for entry in sorted(result.values(), key=lambda e: e["k"]):
        if entry["k"] == default or not entry["intervals"]:
            continue
        cells = [_interval(entry["intervals"].get(c), 1 if c == "mi" else 3, 1e3 if c in PER_MILLE_NAMES else 1.0)
                 for c, _ in cols]
        lines.append(f"| {entry['k']} − {default} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(result: dict[str, dict], args) -> str:
    header = frontier.provenance("experiments.iassa_iterations", args.argv)
    overrides = ", ".join(f"{k} {v}" for k, v in args.overrides.items()) or "IASSA's defaults"
    return "\n".join([
        f"# IASSA: performance against iterations ({args.split} split, first {args.num_images} images; {overrides})",
        "", header, "", metrics_table(result, args.presets, args.default),
        f"Paired differences k − {args.default} (mean over the images [95% bootstrap interval]; bold: the interval "
        f"excludes 0 by more than {NEGLIGIBLE:g} in the printed unit, 0.05 for M_I; the pointing game per "
        "image as a hit; pixel-level scores ×10³).", "", header, "",
        interval_table(result, args.presets, args.default)])


# ---------------------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=("test", "val"), help="the data split (default test)")
    parser.add_argument("--num_images", type=int, default=16, help="first N images of the split (default 16)")
    parser.add_argument("--iterations", type=_ints, default=ITERATIONS, help="the k to report (default 1,2,3,5,10,15,25)")
    parser.add_argument("--default", type=int, default=DEFAULT_ITERATIONS,
                        help="the k every other is paired against (default 5, IASSA's default; always evaluated)")
    parser.add_argument("--stride", type=float, default=None, help="IASSA's initial stride at 224 px (default 8)")
    parser.add_argument("--window", type=float, default=None, help="IASSA's initial window at 224 px (default 45)")
    parser.add_argument("--hparams", type=json.loads, default={}, help="JSON of other IASSA hyper-parameters")
    parser.add_argument("--presets", type=lambda s: tuple(s.split(",")), default=("rise",),
                        help="deletion / insertion protocols (default rise; rise,igos adds iGOS++'s)")
    parser.add_argument("--road", action="store_true", help="also compute ROAD (not one of the paper's metrics)")
    parser.add_argument("--batch_size", type=int, default=8, help="images explained together (default 8)")
    frontier.add_study_arguments(parser, "iassa_iterations")
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in frontier.PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; known {frontier.PRESETS}")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num_images and --batch_size must be >= 1")
    if not args.iterations or min(args.iterations + (args.default,)) < 1:
        parser.error(f"--iterations {args.iterations} and --default {args.default} must be >= 1")
    if not isinstance(args.hparams, dict) or {"name", "alias", "iterations"} & set(args.hparams):
        parser.error("--hparams must be a JSON object of IASSA hyper-parameters other than iterations")
    args.overrides = {**args.hparams, **{k: getattr(args, k) for k in ("window", "stride") if getattr(args, k) is not None}}
    return frontier.finish_study_args(args, argv, *([] if args.road else ["--settings.road_fractions=[]"]))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = plan(args.iterations, args.default, args.overrides)
    if args.dry_run:
        for setting in settings:
            for preset in args.presets:
                print("python evaluate.py " + shlex.join(frontier.evaluate_argv(setting, preset, args.out, args)))
        return {}
    if not args.report_only:
        write_snapshots(settings, args)
        for setting in settings:
            run_setting(setting, args)
    result = collect(settings, args)
    text = report(result, args)
    table = args.table or args.out / "iassa_iterations.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    from saliency_lab.core.files import atomic_write, atomic_write_json

    atomic_write(table, text)
    atomic_write_json(args.out / "iassa_iterations.json", {
        name: {"k": entry["k"], "spec": next(s.spec for s in settings if s.label == name), "summary": entry["summary"],
               "vs_default": entry["intervals"]} for name, entry in result.items()})
    print(text)
    print(f"[iassa_iterations] wrote {table}")
    return result


if __name__ == "__main__":
    main()
