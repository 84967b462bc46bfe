"""Value checks of ``evaluate.py``'s options, run right after parsing: before the output folder is touched,
before ``run.json`` is written and before any data is read or anything is explained.

The checks are data, not code: ``EVALUATE_RULES`` is a table of (option, rule, allowed), where ``option`` is
the dotted config key (``"num_images"``, or ``"settings.mf_steps"`` in a config with nested objects), ``rule``
a predicate ``rule(value, cfg) -> bool`` and ``allowed`` what the option accepts, in words (or a function of
``cfg`` giving them). A rule may also raise ``ValueError`` to give its reason. :func:`validate_args` applies the
table and raises one ``ValueError`` listing every option that breaks its rule, each as
``--OPTION VALUE: [REASON; ]must be ALLOWED``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import explainers
from metrics import CausalProtocol

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
# evaluate.py


def listed_methods(methods: str | Sequence[str]) -> list[str]:
    """``--methods`` as a list of names: comma-separated text or a list, blanks dropped."""
    parts = methods.split(",") if isinstance(methods, str) else list(methods)
    return [m.strip() for m in parts if isinstance(m, str) and m.strip()]


def _methods_ok(value, cfg) -> bool:
    names = listed_methods(value)
    unknown = [m for m in names if m not in explainers.available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} listed twice")
    return bool(names) or bool(cfg.get("ckpt"))


def _hparams_keys_evaluated(value, cfg) -> bool:
    return set(value) <= set(listed_methods(cfg.get("methods")))


def _hparams_allowed(cfg) -> str:
    evaluated = listed_methods(cfg.get("methods"))
    unused = sorted(set(cfg.get("method_hparams") or {}) - set(evaluated))
    one = len(unused) == 1
    return (f"keyed by methods this run evaluates with --methods ({', '.join(evaluated) or 'none'}); "
            f"{', '.join(unused)} {'is' if one else 'are'} not evaluated: drop {'it' if one else 'them'} "
            "(a --method_hparams on the command line replaces the config file's whole dict; hyper-parameters of "
            "a --ckpt explainer come from its checkpoint)")


def _protocol_ok(value, cfg) -> bool:
    if isinstance(value, str):
        return value in ("rise", "igos")
    # A dict: CausalProtocol checks its own fields (steps, units, blur, substrates ...) and names the bad one.
    CausalProtocol(**value)
    return True


def _fractions_ok(value, cfg) -> bool:
    return (len(value) > 0 and all(_is_number(f) and 0 < f <= 1 for f in value)
            and list(value) == sorted(value))


EVALUATE_RULES: tuple[Rule, ...] = (
    Rule("methods", _methods_ok,
         lambda cfg: f"registry methods, comma-separated, each once (known: {', '.join(explainers.available())}), "
                     "at least one unless --ckpt gives a trained explainer"),
    Rule("method_hparams", _hparams_keys_evaluated, _hparams_allowed),
    Rule("split", one_of("test", "val"), "'test' or 'val' (the datamodule's evaluation splits)"),
    Rule("num_images", optional(int_in(1)), "an int >= 1 (the first N images of the split), or unset for all"),
    Rule("batch_size", int_in(1), "an int >= 1"),
    Rule("num_workers", int_in(0), "an int >= 0"),
    Rule("protocol", _protocol_ok, "'rise', 'igos' or a dict of valid CausalProtocol fields"),
    Rule("target", one_of("predicted", "label"), "'predicted' or 'label'"),
    Rule("mf_steps", int_in(1), "an int >= 1 (the number of steps of M_F's preserving curve)"),
    Rule("pointing_tolerance", optional(number_in(0)),
         "a distance in pixels >= 0, or unset for 15 px at 224 scaled to the image size"),
    Rule("iou_threshold", number_in(0, 1), "a number in [0, 1] (threshold of the min-max normalised map)"),
    Rule("top_fraction", number_in(0, 1, low_open=True), "a number in (0, 1] (the fraction of pixels kept)"),
    Rule("max_forward_batch", int_in(1), "an int >= 1"),
    Rule("seed", int_in(0, SEED_LIMIT - 1), f"an int in [0, 2**31) = [0, {SEED_LIMIT})"),
    Rule("overlay_images", int_in(0), "an int >= 0 (0: no overlay figure)"),
    Rule("randomisation_images", int_in(0), "an int >= 0 (0: no randomisation check)"),
    Rule("randomisation_fractions", _fractions_ok, "a non-empty, non-decreasing list of numbers in (0, 1]"),
    Rule("num_nodes", int_in(1), "an int >= 1"),
)


def problems(cfg, rules: Sequence[Rule] = EVALUATE_RULES) -> list[str]:
    """One line per option of ``cfg`` (a jsonargparse Namespace or a dict with dotted keys) that breaks its
    rule, in table order; options absent from ``cfg`` are not checked."""
    found = []
    for row in rules:
        if row.option not in cfg:
            continue
        value = cfg[row.option]
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
