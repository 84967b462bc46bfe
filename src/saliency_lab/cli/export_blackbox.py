"""``saliency-lab export-blackbox CKPT OUT [--half]``: the black-box record of a classifier checkpoint, no optimizer
state and no Lightning (:func:`saliency_lab.core.blackbox.export_blackbox`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from saliency_lab.core.blackbox import export_blackbox


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="saliency-lab export-blackbox", description=export_blackbox.__doc__)
    parser.add_argument("checkpoint", help="a Classifier checkpoint (or a black-box record)")
    parser.add_argument("out", help="where the record goes, e.g. assets/embedded_blackbox.pt")
    parser.add_argument("--half", action="store_true", help="float16 weights")
    args = parser.parse_args(argv)
    export_blackbox(args.checkpoint, args.out, args.half)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB); use it as BlackBox('ckpt:{args.out}')")
