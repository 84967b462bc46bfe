"""Per-image rows on disk: the raw material of every report (``metrics.report``).

A row is one (image, method) pair of an evaluation (``index``, ``method``, every metric value, the cost and
the two curves, see ``metrics.report``). Rows are written as they are scored, one JSON line each, so a run
that is killed loses at most the batch in flight and a rerun skips what is already there.

Why here, in ``metrics``: the rows are the metrics' output and ``metrics.report`` their only reader, so the
writer lives next to the reader, below every layer that produces rows (the evaluation LightningModule,
``evaluate.py``). It does file I/O on plain dicts only: no model, no tensor, nothing from a layer above.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class RowStore:
    """Per-image rows as JSON lines under ``folder``, one file per process (``rows-rank{R}.jsonl``).

    Rows are flushed and fsynced as they are appended, so a killed run loses at most the batch in flight;
    a line cut short by the kill is ignored when reading.
    """

    def __init__(self, folder: str | os.PathLike, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rows-rank{rank}.jsonl"

    def read_all(self) -> list[dict]:
        rows = []
        for path in sorted(self.folder.glob("rows-rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed run
                    continue
        return rows

    def finished(self) -> set[tuple[int, str]]:
        return {(int(r["index"]), r["method"]) for r in self.read_all()}

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
