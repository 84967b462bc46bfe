"""The quality-vs-compute frontier : every method's budget knob swept, each setting evaluated
by ``evaluate.py`` under the ``rise`` and the ``igos`` protocol presets, and for each method the cheapest budget
whose quality equals its full default.

    python -m experiments.frontier [--num_images 64] [--out outputs/frontier] [--methods rise,igos_pp,...]
        [--ckpt_path predictor_ct=PATH ...] [--only LABEL,...] [--report_only] [--dry_run] [--threads 2]
        [--figure docs/frontier.png] [--table outputs/frontier/frontier.md] [--sweep JSON] [--evaluate_args ...]

**Settings.** :data:`SWEEP` lists, per method, its default (the method's docs/methods.md defaults; XPert with the
embedded black box's area weight of ``embedded_claims_table1.yaml``) and the cheaper budgets: RISE N; iGOS++ and
I-GOS iterations x IG points; IASSA iterations x stride; MPert / XPert iterations; FInv iterations; LIME samples.
The one-pass methods (``gradient``, ``gradcam`` and the trained predictors given with ``--ckpt_path NAME=PATH``) are
single points. ``--sweep`` (JSON ``{method: {default: {...}, budgets: [{...}, ...]}}``) replaces the sweep of the
methods it names.

**Evaluation, cached and resumable.** Each setting is one ``evaluate.py`` run (its ``main``, in this process)
into its own folder ``OUT/settings/LABEL/rise`` with ``--save_maps``, then ``OUT/settings/LABEL/igos`` scores the
saved maps under the other preset (``--maps_from``: one explanation per image, scored twice; its rows carry the
explanation's cost). ``evaluate.py`` appends rows as they finish and skips finished ones, so a killed run continues
where it stopped: run the same command again. ``--num_images`` larger than before adds images to every setting.

**Cost per image** (from the rows): black-box passes = forwards + backwards (``Explainer.cost``, exact), and
seconds of the explanation per image of its batch: the process's CPU seconds (``cpu_seconds``, the figure used for
speed-ups) and the wall seconds (``seconds``). With ``--threads 1`` CPU seconds are what the explanation costs on an
idle core, and unlike wall seconds they do not count the time a low-priority run waits for a core on a shared
machine. The metrics' own passes are not counted.

**Equal quality** (:func:`equal_quality`): a budget matches the default when, for every criterion (deletion and
insertion, raw and normalised, under both presets: 8 paired intervals), the 95% paired bootstrap interval of
budget - default over the images both explained (``metrics.report.paired_difference``) includes zero or lies on
the better side (deletion: low <= 0; insertion: high >= 0). Eight intervals at once make the rule conservative:
a budget that truly equals the default fails one of them by chance more often than one in twenty. The
**recommended budget** (:func:`cheapest_equal`) is the one with the fewest passes per image that matches (the
default itself always does); its speed-up = default / budget, in passes and in seconds. The bf16 speed-up per
pass (``benchmarks/fast_blackbox.py``) multiplies the passes speed-up; the seconds here already include it for the
methods that run in bf16 (``precision="auto"``: RISE, IASSA).

Writes ``--figure`` (quality against passes and against seconds per image, every method a line through its
budgets, the default starred, the recommended budget ringed, one-pass methods as single points) and ``--table``
(markdown: every setting's cost and quality, then the recommendation per method), and prints both.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch


from saliency_lab import explainers
from saliency_lab.core.machine import cpu_model
from saliency_lab.metrics.report import paired_difference
from saliency_lab.metrics.rows import RowStore

PRESETS = ("rise", "igos")
QUALITY_KEYS = ("deletion", "insertion", "deletion_norm", "insertion_norm")
LOWER_IS_BETTER = {"deletion", "deletion_norm"}
DEFAULT_CONFIG = "configs/evaluate/embedded_evaluate.yaml"


def provenance(script: str, argv: list[str]) -> str:
    """Date, commit, CPU model and the exact command ``python -m SCRIPT ARGV``: the header every results table
    carries."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    command = f"python -m {script} " + shlex.join(argv)
    return (f"Measured {datetime.date.today().isoformat()}, commit `{commit}`, machine: {cpu_model()} "
            f"({torch.get_num_threads()} torch threads). Command: `{command}`.")


def finish_study_args(args: argparse.Namespace, argv: list[str] | None, *evaluate_args: str) -> argparse.Namespace:
    """What every study driver's parse ends with: the evaluation arguments (the split, the driver's own, then the
    user's ``--evaluate_args``) and the command line the provenance header prints."""
    args.evaluate_args = [f"--split={args.split}", *evaluate_args, *args.evaluate_args]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def add_study_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every study driver shares (call it last: ``--evaluate_args`` takes the rest of the line):
    ``--out`` (default outputs/<name>), ``--table`` (default <out>/<name>.md), ``--config``, ``--threads``,
    ``--resamples``, ``--report_only``, ``--dry_run``, ``--evaluate_args``."""
    parser.add_argument("--out", type=Path, default=Path(f"outputs/{name}"))
    parser.add_argument("--table", type=Path, default=None, help=f"default OUT/{name}.md")
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                        help="evaluate.py config giving the black box, data and metric settings (frontier's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--report_only", action="store_true", help="evaluate nothing; report the finished rows")
    parser.add_argument("--dry_run", action="store_true", help="print the evaluate.py commands and stop")
    parser.add_argument("--evaluate_args", nargs=argparse.REMAINDER, default=[],
                        help="everything after it goes to every evaluate.py run")


# XPert on the embedded black box (embedded_claims_table1.yaml): area weight 3 growing by 1.034554 per iteration
# over 300 iterations. Fewer iterations keep the schedule's end points: growth^(300/T) and the learning rate
# scaled as XPert's own default is (the released 0.01 x 800 iterations / T).
_XPERT = {"area_weight": 3.0, "area_growth": 1.034554}


def _xpert(iterations: int) -> dict:
    return {**_XPERT, "iterations": iterations, "area_growth": _XPERT["area_growth"] ** (300 / iterations),
            "lr": 0.01 * 800 / iterations}


SWEEP: dict[str, dict] = {
    "rise": {"default": {"n_masks": 8000}, "budgets": [{"n_masks": n} for n in (250, 500, 1000, 2000, 4000)]},
    "igos_pp": {"default": {}, "budgets": [{"iterations": t, "ig_steps": n} for t, n in ((5, 5), (10, 5), (5, 10),
                                                                                         (10, 10))]},
    "igos": {"default": {}, "budgets": [{"iterations": t, "ig_steps": n} for t, n in ((5, 5), (10, 10))]},
    "iassa": {"default": {}, "budgets": [{"iterations": t, "stride": s} for t, s in ((2, 16.0), (3, 16.0), (5, 16.0),
                                                                                    (3, 8.0))]},
    "mpert": {"default": {}, "budgets": [{"iterations": 100}]},
    "xpert": {"default": _XPERT, "budgets": [_xpert(100)]},
    "finv": {"default": {}, "budgets": [{"inversion_iterations": 5, "class_iterations": 30}]},
    "lime": {"default": {}, "budgets": [{"n_samples": 250}]},
}
ONE_PASS = ("gradient", "gradcam")
# The knobs a budget is named by in the table (values from the evaluation's recorded hyper-parameters).
KNOBS = {"rise": ("n_masks",), "igos_pp": ("iterations", "ig_steps"), "igos": ("iterations", "ig_steps"),
         "iassa": ("iterations", "stride"), "mpert": ("iterations",), "xpert": ("iterations",),
         "finv": ("inversion_iterations", "class_iterations"), "lime": ("n_samples",)}
# Settings that are not budgets but may be swept beside them (--sweep; e.g. iGOS++'s smoothness weight l2 on small
# grids, README "iGOS++ on small grids"): named in labels and the table when given.
VARIANT_KEYS = ("l2",)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep: ``method`` (registry name), its explainer ``spec`` (explainers/specs.py), the
    folder ``label`` and whether it is the method's default (the reference of the equal-quality rule)."""

    method: str
    label: str
    spec: dict
    default: bool


def _label(method: str, hparams: dict, default: bool) -> str:
    if default:
        return f"{method}-default"
    parts = [f"{k}={hparams[k]:g}" if isinstance(hparams[k], float) else f"{k}={hparams[k]}"
             for k in dict.fromkeys((*KNOBS.get(method, sorted(hparams)), *VARIANT_KEYS)) if k in hparams]
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join([method, *parts]))


def plan(methods: list[str], sweep: dict[str, dict], checkpoints: dict[str, str]) -> list[Setting]:
    """The settings to evaluate, method by method (cheaper budgets first, then the default); one-pass methods
    and ``checkpoints`` (trained predictor name -> path) as single settings."""
    settings = []
    for method in methods:
        if method in sweep:
            entry = sweep[method]
            for hparams in entry.get("budgets", []):
                settings.append(Setting(method, _label(method, hparams, False), {"name": method, **hparams}, False))
            settings.append(Setting(method, _label(method, {}, True), {"name": method, **entry.get("default", {})},
                                    True))
        else:
            settings.append(Setting(method, method, {"name": method}, True))
    for name, path in checkpoints.items():
        settings.append(Setting(name, name, {"name": name, "checkpoint": path}, True))
    return settings


def evaluate_argv(setting: Setting, preset: str, out: Path, args) -> list[str]:
    """The ``evaluate.py`` arguments of one setting under one preset (the first preset explains and saves its
    maps, the others score those maps)."""
    folder = out / "settings" / setting.label
    argv = ["--config", str(args.config), f"--num_images={args.num_images}", "--wandb=false", "--overlay_images=0",
            f"--explainers={json.dumps([setting.spec])}", "--method_hparams={}", "--ckpt_path=[]",
            f"--settings.protocol={preset}", f"--out={folder / preset}"]
    argv.append("--save_maps=true" if preset == args.presets[0] else f"--maps_from={folder / args.presets[0]}")
    return argv + list(args.evaluate_args)


def run_setting(setting: Setting, out: Path, args) -> None:
    """Evaluate one setting under every preset (evaluate.py resumes each from its rows)."""
    import evaluate

    for preset in args.presets:
        argv = evaluate_argv(setting, preset, out, args)
        print(f"[frontier] {setting.label} / {preset}: python evaluate.py {' '.join(_quote(a) for a in argv)}",
              flush=True)
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):  # evaluate.py prints its whole summary table each time
            evaluate.main(argv)


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}[]\"") else arg


# ---------------------------------------------------------------------------------------------------------
# Reading the results


def setting_rows(setting: Setting, out: Path, presets: tuple[str, ...], num_images: int) -> dict[str, list[dict]]:
    """preset -> the setting's rows there: the method's rows of the folder's last run on the first ``num_images``
    images of the split (as evaluate.py reports them; rows of a larger run in the same folder stay unread), []
    when not run yet."""
    rows = {}
    for preset in presets:
        folder = out / "settings" / setting.label / preset
        if not (folder / "run.json").is_file():
            rows[preset] = []
            continue
        keys = json.loads((folder / "run.json").read_text()).get("row_keys")
        rows[preset] = list(RowStore(folder / "rows").scan(keys, range(num_images)).of(parse_key(setting)))
    return rows


def parse_key(setting: Setting) -> str:
    return explainers.explainer_key(setting.spec)


def recorded_hparams(setting: Setting, out: Path, preset: str) -> dict:
    path = out / "settings" / setting.label / preset / "run.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("methods_hparams", {}).get(parse_key(setting), {})


def budget_text(setting: Setting, hparams: dict) -> str:
    knobs = KNOBS.get(setting.method, ())
    values = {k: hparams.get(k, setting.spec.get(k)) for k in knobs}
    values.update({k: setting.spec[k] for k in VARIANT_KEYS if k in setting.spec})
    if not knobs:
        return "one pass" if not setting.spec.get("checkpoint") else "trained, one pass"
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def summarise_setting(rows: dict[str, list[dict]]) -> dict:
    """Images, passes / forwards / backwards per image, ``seconds`` (CPU) and ``wall_seconds`` per image (from
    the first preset's rows, the explanation itself) and the mean of every quality key under every preset."""
    first = next(iter(rows.values()))
    summary = {"images": min((len(r) for r in rows.values()), default=0)}
    for key, source in (("forwards", "forwards"), ("backwards", "backwards"), ("wall_seconds", "seconds"),
                        ("seconds", "cpu_seconds")):
        values = [float(r[source]) for r in first if r.get(source) is not None]
        summary[key] = sum(values) / len(values) if values else math.nan
    summary["passes"] = summary["forwards"] + summary["backwards"]
    for preset, mine in rows.items():
        for key in QUALITY_KEYS:
            values = [float(r[key]) for r in mine if r.get(key) is not None and not math.isnan(float(r[key]))]
            summary[f"{preset}/{key}"] = sum(values) / len(values) if values else math.nan
    return summary


def paired_against_default(budget: dict[str, list[dict]], default: dict[str, list[dict]],
                           resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``preset/key`` -> paired difference budget - default (mean, 95% interval, images) over the images both
    have, per quality key and preset (``metrics.report.paired_difference``)."""
    intervals = {}
    for preset in budget:
        rows = [{**r, "method": "budget"} for r in budget[preset]] + \
               [{**r, "method": "default"} for r in default.get(preset, [])]
        if not budget[preset] or not default.get(preset):
            continue
        table = paired_difference(rows, "budget", "default", keys=QUALITY_KEYS, resamples=resamples, seed=seed)
        intervals.update({f"{preset}/{key}": stats for key, stats in table.items()})
    return intervals


def equal_quality(intervals: dict[str, dict[str, float]], criteria: tuple[str, ...]) -> bool | None:
    """Whether a budget matches its default: for every criterion ``preset/key`` the paired interval of budget -
    default includes zero or is better (deletion: low <= 0, lower is better; insertion: high >= 0). None when no
    criterion could be tested (no common images)."""
    tested = [c for c in criteria if c in intervals]
    if not tested:
        return None
    for criterion in tested:
        stats = intervals[criterion]
        if criterion.split("/")[-1] in LOWER_IS_BETTER:
            if stats["low"] > 0:
                return False
        elif stats["high"] < 0:
            return False
    return True


def cheapest_equal(candidates: list[dict]) -> dict | None:
    """The candidate with the fewest passes per image (then the fewest seconds) among those with ``equal`` True;
    each candidate is a dict with ``passes``, ``seconds`` and ``equal`` (the default itself has ``equal`` True)."""
    matching = [c for c in candidates if c.get("equal")]
    if not matching:
        return None
    return min(matching, key=lambda c: (c["passes"], c["seconds"] if not math.isnan(c["seconds"]) else math.inf))


def frontier(settings: list[Setting], out: Path, presets: tuple[str, ...], criteria: tuple[str, ...],
             num_images: int, resamples: int = 2000) -> dict[str, dict]:
    """method -> {"settings": [row per setting], "recommended": row or None, "default": row or None}; a row holds
    the setting, its budget text, :func:`summarise_setting` and, for budgets, the intervals and ``equal``."""
    by_method: dict[str, dict] = {}
    for setting in settings:
        rows = setting_rows(setting, out, presets, num_images)
        if not any(rows.values()):
            continue
        row = {"setting": setting, "budget": budget_text(setting, recorded_hparams(setting, out, presets[0])),
               **summarise_setting(rows), "rows": rows}
        by_method.setdefault(setting.method, {"settings": []})["settings"].append(row)
    for method, entry in by_method.items():
        default = next((r for r in entry["settings"] if r["setting"].default), None)
        entry["default"] = default
        for row in entry["settings"]:
            if default is None:
                row["intervals"], row["equal"] = {}, None
            elif row is default:
                row["intervals"], row["equal"] = {}, True
            else:
                row["intervals"] = paired_against_default(row["rows"], default["rows"], resamples)
                row["equal"] = equal_quality(row["intervals"], criteria)
        entry["recommended"] = cheapest_equal(entry["settings"]) if default is not None else None
    return by_method


# ---------------------------------------------------------------------------------------------------------
# Outputs


def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cost(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _seconds(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _interval_note(row: dict, criteria: tuple[str, ...]) -> str:
    """The criteria a budget fails (its interval lies on the worse side), or 'equal'."""
    if row["setting"].default:
        return "default"
    if row["equal"] is None:
        return "not tested"
    failed = []
    for criterion in criteria:
        stats = row["intervals"].get(criterion)
        if stats is None:
            continue
        worse = stats["low"] > 0 if criterion.split("/")[-1] in LOWER_IS_BETTER else stats["high"] < 0
        if worse:
            failed.append(f"{criterion} {stats['mean']:+.3f} [{stats['low']:+.3f}, {stats['high']:+.3f}]")
    return "equal" if not failed else "worse: " + "; ".join(failed)


def markdown_table(result: dict[str, dict], presets: tuple[str, ...], criteria: tuple[str, ...]) -> str:
    """Every setting (cost, quality under every preset, the equal-quality verdict), then the recommendations."""
    quality = [f"{p} {k.replace('_norm', ' norm.')} {'↓' if k in LOWER_IS_BETTER else '↑'}"
               for p in presets for k in QUALITY_KEYS]
    lines = ["| method | budget | images | passes / image | CPU s / image | wall s / image | " + " | ".join(quality)
             + " | vs default |", "|---|---|---|---|---|---|" + "---|" * len(quality) + "---|"]
    for method, entry in result.items():
        for row in sorted(entry["settings"], key=lambda r: r["passes"]):
            values = " | ".join(_f(row[f"{p}/{k}"]) for p in presets for k in QUALITY_KEYS)
            budget = row["budget"] + (" (default)" if row["setting"].default and method in SWEEP else "")
            lines.append(f"| {method} | {budget} | {row['images']} | {_cost(row['passes'])} | "
                         f"{_seconds(row['seconds'])} | {_seconds(row['wall_seconds'])} | {values} | "
                         f"{_interval_note(row, criteria)} |")
    lines += ["", "| method | default: passes, CPU s / image | cheapest budget at equal quality | its passes, CPU s / "
                  "image | speed-up in passes | speed-up in CPU seconds |", "|---|---|---|---|---|---|"]
    for method, entry in result.items():
        default, best = entry.get("default"), entry.get("recommended")
        if method not in SWEEP or default is None or best is None:
            continue
        lines.append(f"| {method} | {_cost(default['passes'])}, {_seconds(default['seconds'])} | {best['budget']} | "
                     f"{_cost(best['passes'])}, {_seconds(best['seconds'])} | "
                     f"{default['passes'] / best['passes']:.1f}x | {_speedup(default['seconds'], best['seconds'])} |")
    return "\n".join(lines) + "\n"


def _speedup(slow: float, fast: float) -> str:
    if any(v is None or math.isnan(v) or v <= 0 for v in (slow, fast)):
        return "–"
    return f"{slow / fast:.1f}x"


def recommendation_lines(result: dict[str, dict]) -> list[str]:
    lines = []
    for method, entry in result.items():
        default, best = entry.get("default"), entry.get("recommended")
        if method not in SWEEP:
            continue
        if default is None:
            lines.append(f"{method}: the default setting has no rows yet; no recommendation")
            continue
        images = min(r["images"] for r in entry["settings"])
        lines.append(f"{method}: cheapest budget at equal quality: {best['budget']} ({_cost(best['passes'])} passes, "
                     f"{_seconds(best['seconds'])} CPU s per image) against the default {default['budget']} "
                     f"({_cost(default['passes'])} passes, {_seconds(default['seconds'])} CPU s): "
                     f"{default['passes'] / best['passes']:.1f}x fewer passes, "
                     f"{_speedup(default['seconds'], best['seconds'])} in CPU seconds [{images}+ images]")
    return lines


def figure(result: dict[str, dict], presets: tuple[str, ...], path: Path) -> None:
    """Quality (rows: every quality key) against passes and against seconds per image (columns: per preset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saliency_lab.core.files import atomic_write

    columns = [(p, axis) for p in presets for axis in ("passes", "seconds")]
    fig, axes = plt.subplots(len(QUALITY_KEYS), len(columns), figsize=(4.2 * len(columns), 3.3 * len(QUALITY_KEYS)),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m, (method, entry) in enumerate(result.items()):
        rows = sorted(entry["settings"], key=lambda r: r["passes"])
        colour = colours[m % len(colours)]
        for i, key in enumerate(QUALITY_KEYS):
            for j, (preset, axis) in enumerate(columns):
                ax = axes[i][j]
                xs = [max(r[axis], 1e-4) for r in rows]
                ys = [r[f"{preset}/{key}"] for r in rows]
                ax.plot(xs, ys, "-o" if len(rows) > 1 else "s", color=colour, markersize=4,
                        label=method if (i, j) == (0, 0) else None)
                for r, x, y in zip(rows, xs, ys):
                    if r["setting"].default and len(rows) > 1:
                        ax.plot([x], [y], "*", color=colour, markersize=12)
                    if entry.get("recommended") is r and not r["setting"].default:
                        ax.plot([x], [y], "o", markerfacecolor="none", markeredgecolor="black", markersize=11)
                ax.set_xscale("log")
                ax.set_xlabel("black-box passes per image" if axis == "passes" else "CPU seconds per image")
                ax.set_ylabel(f"{key.replace('_', ' ')} ({preset}) {'↓' if key in LOWER_IS_BETTER else '↑'}")
                ax.grid(True, alpha=0.3, which="both")
    fig.legend(loc="upper center", ncol=min(8, len(result)), bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("quality vs compute (★ default, ○ cheapest budget at equal quality)", y=1.02)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=64, help="first N test images (default 64)")
    parser.add_argument("--out", type=Path, default=Path("outputs/frontier"))
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                        help="evaluate.py config giving the black box, data, split and metric settings")
    parser.add_argument("--methods", default=",".join([*SWEEP, *ONE_PASS]),
                        help="methods to sweep (their SWEEP entry) or to place as one point")
    parser.add_argument("--ckpt_path", action="append", default=[], metavar="NAME=PATH",
                        help="a trained predictor as one point, e.g. predictor_ct=outputs/demo/predictor_ct/"
                             "checkpoints/last.ckpt (repeatable)")
    parser.add_argument("--sweep", type=json.loads, default={},
                        help='JSON replacing the sweep of the methods it names: {"rise": {"default": '
                             '{"n_masks": 8000}, "budgets": [{"n_masks": 500}]}}')
    parser.add_argument("--presets", type=lambda s: tuple(s.split(",")), default=PRESETS)
    parser.add_argument("--criteria", type=lambda s: tuple(s.split(",")), default=None,
                        help="preset/key intervals of the equal-quality rule (default: every preset x "
                             f"{','.join(QUALITY_KEYS)})")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                        help="run only these setting labels or methods (the report reads every finished setting)")
    parser.add_argument("--report_only", action="store_true", help="evaluate nothing; report the finished rows")
    parser.add_argument("--dry_run", action="store_true", help="print the evaluate.py commands and stop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--figure", type=Path, default=None, help="default OUT/frontier.png")
    parser.add_argument("--table", type=Path, default=None, help="default OUT/frontier.md")
    parser.add_argument("--evaluate_args", nargs=argparse.REMAINDER, default=[],
                        help="everything after it goes to every evaluate.py run, e.g. "
                             "--blackbox.init_args.precision=32")
    args = parser.parse_args(argv)
    unknown = [c for c in args.presets if c not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; known {PRESETS}")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}")
    args.criteria = args.criteria or tuple(f"{p}/{k}" for p in args.presets for k in QUALITY_KEYS)
    bad = [c for c in args.criteria if c.partition("/")[0] not in args.presets or c.partition("/")[2] not in QUALITY_KEYS]
    if bad:
        parser.error(f"--criteria {bad}: each must be PRESET/KEY with PRESET in {args.presets} and KEY in {QUALITY_KEYS}")
    checkpoints = {}
    for entry in args.ckpt_path:
        name, sep, path = entry.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--ckpt_path {entry!r}: expected NAME=PATH of an existing checkpoint")
        checkpoints[name] = path
    args.checkpoints = checkpoints
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registered = set(explainers.available())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    missing = [m for m in methods if m not in registered]
    if missing:
        print(f"[frontier] not registered, left out: {missing}")
    sweep = {**SWEEP, **args.sweep}
    settings = plan([m for m in methods if m in registered], sweep, args.checkpoints)
    out = args.out
    if args.dry_run:
        for setting in settings:
            for preset in args.presets:
                print("python evaluate.py " + " ".join(_quote(a) for a in evaluate_argv(setting, preset, out, args)))
        return {}
    if not args.report_only:
        for setting in settings:
            if args.only is None or setting.label in args.only or setting.method in args.only:
                run_setting(setting, out, args)
    result = frontier(settings, out, args.presets, args.criteria, args.num_images, args.resamples)
    table = markdown_table(result, args.presets, args.criteria)
    lines = recommendation_lines(result)
    table_path = args.table or out / "frontier.md"
    figure_path = args.figure or out / "frontier.png"
    table_path.parent.mkdir(parents=True, exist_ok=True)
    from saliency_lab.core.files import atomic_write

    atomic_write(table_path, table + "\n" + "\n".join(lines) + "\n")
    if result:
        figure(result, args.presets, figure_path)
    print(table)
    print("\n".join(lines))
    print(f"[frontier] wrote {table_path} and {figure_path}")
    return result


if __name__ == "__main__":
    main()
