"""Value checks of ``evaluate.py``'s options, run right after parsing: before the output folder is touched,
before ``run.json`` is written and before any data is read or anything is explained.

The checks are data, not code: ``EVALUATE_RULES`` is a table of (option, rule, allowed), where ``option`` is
the dotted config key (``"num_images"``, or ``"settings.mf_steps"`` for a nested object's field), ``rule``
a predicate ``rule(value, cfg) -> bool`` and ``allowed`` what the option accepts, in words (or a function of
``cfg`` giving them). A rule may also raise ``ValueError`` to give its reason. :func:`validate_args` applies the
table and raises one ``ValueError`` listing every option that breaks its rule, each as
``--OPTION VALUE: [REASON; ]must be ALLOWED``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from saliency_lab import explainers
from saliency_lab.core.blackbox import checkpoint_of, resolve_weights
from saliency_lab.core.checkpoints import remote_scheme
from saliency_lab.core.files import safe_name
from saliency_lab.core.resources import resolve_resource
from saliency_lab.explainers import ExplainerSpec, parse_spec
from saliency_lab.metrics import TARGET_RULES, make_protocol

SEED_LIMIT = 2**31  # explainers take seeds in [0, 2**31)


@dataclass(frozen=True)
class Rule:
    """One row of a check table: ``option`` must satisfy ``rule``; ``allowed`` says what it accepts."""

    option: str
    rule: Callable[[Any, Any], bool]
    allowed: str | Callable[[Any], str]


# ---------------------------------------------------------------------------------------------------------
# Rule builders (each returns rule(value, cfg) -> bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def int_in(low: int, high: float = math.inf) -> Callable[[Any, Any], bool]:
    """An int in [low, high]."""
    return lambda value, cfg: _is_int(value) and low <= value <= high


def number_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[Any, Any], bool]:
    """A finite number in [low, high] ((low, high] with ``low_open``)."""
    return lambda value, cfg: _is_number(value) and (low < value if low_open else low <= value) and value <= high


def one_of(*choices: str) -> Callable[[Any, Any], bool]:
    return lambda value, cfg: value in choices


def optional(rule: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """None (the option's "unset" default) or a value passing ``rule``."""
    return lambda value, cfg: value is None or rule(value, cfg)


# ---------------------------------------------------------------------------------------------------------
# evaluate.py: how its --explainers and --ckpt_path read (evaluate.explainer_specs builds on these), then its table


def listed_specs(value: str | Sequence[ExplainerSpec] | None) -> list[ExplainerSpec]:
    """``--explainers`` as a list of specs (explainers/specs.py): comma-separated names or a list of names and
    ``{name, alias, checkpoint, **hparams}`` dicts; names stripped, blanks dropped."""
    given = value.split(",") if isinstance(value, str) else list(value or [])
    specs = [spec.strip() if isinstance(spec, str) else dict(spec) if isinstance(spec, Mapping) else spec
             for spec in given]
    return [spec for spec in specs if spec]


def split_ckpt_entry(entry: str) -> tuple[str | None, str]:
    """A ``--ckpt_path`` entry: ``NAME=PATH`` -> (NAME, PATH); a plain path (even one holding '=') -> (None, PATH)."""
    wanted, sep, path = entry.partition("=")
    if not sep or "/" in wanted or Path(entry).exists():
        return None, entry
    return wanted, path


def ckpt_spec(entry: str) -> dict[str, str]:
    """The explainer spec ``{name, checkpoint}`` of a ``--ckpt_path`` entry; a plain PATH is evaluated as the method
    its checkpoint records (read with ``weights_only=True``; a URL is refused, nothing is downloaded)."""
    wanted, path = split_ckpt_entry(entry)
    return {"name": wanted or explainers.recorded_name(path), "checkpoint": path}


def _spec_keys(value) -> list[str]:
    """The keys (alias, else name) of the ``--explainers`` specs that parse; the explainers rule names the others."""
    keys = []
    for spec in listed_specs(value):
        try:
            keys.append(parse_spec(spec).key)
        except (ValueError, TypeError):
            pass
    return keys


def _explainers_ok(value, cfg) -> bool:
    specs = listed_specs(value)
    names = [parse_spec(spec).name for spec in specs]  # a dict without 'name' or a number: its own reason
    unknown = [name for name in names if name not in explainers.available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}")
    keys = _spec_keys(specs)
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} listed twice (give each an 'alias')")
    _local_files([parse_spec(spec).checkpoint for spec in specs if parse_spec(spec).checkpoint])
    return bool(specs) or bool(cfg.get("ckpt_path"))


def _file_problem(path: str) -> str | None:
    """Why a checkpoint or weights ``path`` cannot be read: a URL (nothing is downloaded) or no such file."""
    scheme = remote_scheme(path)
    if scheme is not None:
        return f"{path} is a {scheme}:// URL (checkpoints are read from local files only: nothing is downloaded)"
    return None if Path(resolve_resource(path)).is_file() else f"no such file {path}"


def _local_files(paths: Sequence[str]) -> bool:
    bad = [problem for problem in map(_file_problem, paths) if problem]
    if bad:
        raise ValueError("; ".join(bad))
    return True


def _ckpt_ok(value, cfg) -> bool:
    for entry in value or []:
        wanted = split_ckpt_entry(entry)[0]
        if wanted is not None:  # a NAME= names the method's results and its maps/NAME folder
            safe_name(wanted, "method NAME")
    return _local_files([split_ckpt_entry(entry)[1] for entry in value or []])


def _blackbox_model_ok(value, cfg) -> bool:
    path = checkpoint_of(str(value))
    return _local_files([] if path is None else [path])


def _weights_ok(value, cfg) -> bool:
    # BlackBox reads the text "None" / "null" (how jsonargparse hands over a nested null) as null too
    if value in (None, "None", "null"):
        return True
    try:  # a relative path is also looked up under $SALIENCY_LAB_WEIGHTS, as BlackBox does
        found = resolve_weights(str(value))
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    return _local_files([found])


def _not_evaluated(cfg) -> list[str]:
    """Keys of ``--method_hparams`` that name no explainer of this run (``--explainers`` keys, then the methods
    of the ``--ckpt_path`` entries, whose recorded names are read only when needed)."""
    unused = set(cfg.get("method_hparams") or {}) - set(_spec_keys(cfg.get("explainers")))
    for entry in (cfg.get("ckpt_path") or []) if unused else []:
        try:
            unused.discard(ckpt_spec(entry)["name"])
        except (OSError, ValueError, RuntimeError):  # a missing or refused file: the --ckpt_path rule names it
            pass
    return sorted(unused)


def _hparams_allowed(cfg) -> str:
    evaluated = _spec_keys(cfg.get("explainers"))
    unused = _not_evaluated(cfg)
    one = len(unused) == 1
    return (f"keyed by explainers this run evaluates (--explainers: {', '.join(evaluated) or 'none'}, or a --ckpt_path "
            f"method); {', '.join(unused)} {'is' if one else 'are'} not evaluated: drop {'it' if one else 'them'} "
            "(a --method_hparams on the command line replaces the config file's whole dict)")


def _protocol_ok(value, cfg) -> bool:
    # A preset name or a dict: make_protocol checks the preset and CausalProtocol its fields (steps, units, blur,
    # substrates ...), naming the bad one. The image size only scales presets, so any size shows validity.
    target = cfg.get("target")
    make_protocol(value, 224, target=target if target in TARGET_RULES else None)
    return True


def _fractions_ok(value, cfg) -> bool:
    return (len(value) > 0 and all(_is_number(f) and 0 < f <= 1 for f in value)
            and list(value) == sorted(value))


def _earlier_run(value, cfg) -> bool:
    return (Path(value) / "run.json").is_file()


EVALUATE_RULES: tuple[Rule, ...] = (
    Rule("explainers", _explainers_ok,
         lambda cfg: f"registry names (comma-separated, or a list of names and {{name, alias, checkpoint, ...}} "
                     f"dicts), each key once (known: {', '.join(explainers.available())}), checkpoints local files, at "
                     "least one explainer unless --ckpt_path gives a trained one"),
    Rule("blackbox.init_args.model", _blackbox_model_ok,
         "'timm:NAME', 'torchvision:NAME' or 'ckpt:PATH' of a local black-box checkpoint"),
    Rule("blackbox.init_args.weights", _weights_ok, "a local weights file, or unset"),
    Rule("ckpt_path", _ckpt_ok, "local trained-explainer checkpoint files, each PATH or NAME=PATH"),
    Rule("method_hparams", lambda value, cfg: not _not_evaluated(cfg), _hparams_allowed),
    Rule("split", one_of("test", "val"), "'test' or 'val' (the datamodule's evaluation splits)"),
    Rule("num_images", optional(int_in(1)), "an int >= 1 (the first N images of the split), or unset for all"),
    Rule("batch_size", int_in(1), "an int >= 1"),
    Rule("num_workers", int_in(0), "an int >= 0"),
    Rule("settings.protocol", _protocol_ok, "a preset ('rise', 'igos', or a held-out one: 'noise', 'blur_wide', "
         "'grid16') or a dict of valid CausalProtocol fields"),
    Rule("target", one_of(*TARGET_RULES), " or ".join(repr(rule) for rule in TARGET_RULES)),
    Rule("settings.mf_steps", int_in(1), "an int >= 1 (the number of steps of M_F's preserving curve)"),
    Rule("settings.mf_eps", number_in(0), "a number >= 0 (images with q_O - q_F <= mf_eps are excluded from M_F)"),
    Rule("settings.pointing_tolerance", optional(number_in(0)),
         "a distance in pixels >= 0, or unset for 15 px at 224 scaled to the image size"),
    Rule("settings.iou_threshold", number_in(0, 1), "a number in [0, 1] (threshold of the min-max normalised map)"),
    Rule("settings.top_fraction", number_in(0, 1, low_open=True), "a number in (0, 1] (the fraction of pixels kept)"),
    Rule("max_forward_batch", int_in(1), "an int >= 1"),
    Rule("seed", int_in(0, SEED_LIMIT - 1), f"an int in [0, 2**31) = [0, {SEED_LIMIT})"),
    Rule("overlay_images", int_in(0), "an int >= 0 (0: no overlay figure)"),
    Rule("randomisation_images", int_in(0), "an int >= 0 (0: no randomisation check)"),
    Rule("randomisation_fractions", _fractions_ok, "a non-empty, non-decreasing list of numbers in (0, 1]"),
    Rule("maps_from", optional(_earlier_run), "an earlier evaluate.py --out folder (holding run.json), or unset"),
    Rule("trainer.num_nodes", int_in(1), "an int >= 1"),
)


def problems(cfg, rules: Sequence[Rule] = EVALUATE_RULES) -> list[str]:
    """One line per option of ``cfg`` (a jsonargparse Namespace or a dict with dotted keys) that breaks its
    rule, in table order; options absent from ``cfg`` are not checked."""
    found = []
    for row in rules:
        if row.option not in cfg:
            continue
        value = cfg[row.option]
        if hasattr(value, "as_dict"):  # a nested object's fields (e.g. --settings.protocol as a dict): a plain dict
            value = value.as_dict()
        try:
            ok, reason = bool(row.rule(value, cfg)), ""
        except (ValueError, TypeError) as err:  # the rule's own reason, said first
            ok, reason = False, f"{err}; "
        if not ok:
            allowed = row.allowed(cfg) if callable(row.allowed) else row.allowed
            found.append(f"--{row.option} {value!r}: {reason}must be {allowed}")
    return found


def validate_args(cfg, rules: Sequence[Rule] = EVALUATE_RULES) -> None:
    """Raise one ``ValueError`` naming every option that breaks its rule (see :func:`problems`)."""
    found = problems(cfg, rules)
    if found:
        raise ValueError("invalid option value(s), nothing was run:\n  " + "\n  ".join(found))


# Trainer precisions the explainers can honour: they run their passes at the black box's own precision
# (--blackbox.init_args.precision), so a Trainer-level autocast would only mix dtypes inside the methods
# (RISE's and IASSA's tensordot of float32 masks with bf16 scores).
HONOURED_TRAINER_PRECISIONS = (None, "32", "32-true", 32)


def check_trainer_precision(precision, flag: str) -> None:
    """Refuse, before any work, a Trainer precision (``flag``: the option that gave it) the explainers and metrics
    cannot honour, naming the option that does what the user wants."""
    if precision not in HONOURED_TRAINER_PRECISIONS:
        raise ValueError(f"{flag}={precision} is not supported for explainers: every method and metric runs its "
                         "passes at the black box's precision; use --blackbox.init_args.precision=bf16 (or auto, "
                         "the default: bf16 where the device computes it natively) and leave "
                         f"{flag} at 32-true")


def changed_leaves(before, now, prefix: str = "") -> list[str]:
    """The leaves that differ between two JSON records, as 'a.b: old -> new' (how reruns and comparisons name
    what changed between two run records)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [c for k in sorted(set(before) | set(now), key=str)
                for c in changed_leaves(before.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if before == now else [f"{prefix.rstrip('.')}: {before!r} -> {now!r}"]
