"""Per-image rows on disk: the raw material of every report (``metrics.report``).

A row is one (image, method) pair of an evaluation (``index``, ``method``, ``key``, every metric value, the
cost and the two curves, see ``metrics.report``). Rows are written as they are scored, one JSON line each, so
a run that is killed loses at most the batch in flight and a rerun skips what is already there.

**Keys.** A row's ``key`` (:func:`content_key`) identifies everything that produced it: the method's full
resolved hyper-parameters, its checkpoint's content hash, the black box's content hash, the data and the
protocol (``evaluate.py`` builds the record). Readers ask for the rows of the current key of each method,
so a rerun with other settings recomputes exactly the rows whose key changed and reuses the rest; rows of an
older key stay in the file (switching back reuses them) but are never mixed into a report.

**Torn lines.** ``kill -9`` or a full disk during an append can leave the last line cut short. Readers ignore
such a line, and :meth:`RowStore.append` truncates the file back to its last newline before writing, so the
next row is never glued onto it (which would lose that row too).

**Bounded memory.** Reading goes through :class:`RowSet`, a small index (image index and byte offset per
row, in numpy arrays) built in one streaming pass; rows are then read back one method at a time, without
their curves unless asked. ``benchmarks/rows_memory.py`` measures it at 50,000 images x 13 methods.

Why here, in ``metrics``: the rows are the metrics' output and ``metrics.report`` their only reader, so the
writer lives next to the reader, below every layer that produces rows (the evaluation LightningModule,
``evaluate.py``). It does file I/O on plain dicts only: no model, no tensor, nothing from a layer above.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from array import array
from pathlib import Path
from typing import Any, Container, Iterable, Iterator, Mapping

import numpy as np

from saliency_lab.core.files import append_lines

CURVES = ("deletion_curve", "insertion_curve")
_CURVES_START = b', "deletion_curve": ['
_OFFSET_BITS = 48  # a row's location: file number << 48 | byte offset (files up to 256 TiB)


def content_key(record: Any) -> str:
    """A short hex digest (64 bits) of ``record``'s canonical JSON (sorted keys; non-JSON values by ``str``):
    equal records give equal keys in any process and any Python session."""
    text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RowStore:
    """Per-image rows as JSON lines under ``folder``, one file per process (``rows-rank{R}.jsonl``).

    Rows are flushed and fsynced as they are appended, so a killed run loses at most the batch in flight.
    """

    def __init__(self, folder: str | os.PathLike, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rows-rank{rank}.jsonl"

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("rows-rank*.jsonl"))

    def append(self, rows: Iterable[dict]) -> None:
        """Append ``rows`` (one JSON line each) after cutting a torn last line (``core.files.append_lines``)."""
        dropped = append_lines(self.path, "".join(json.dumps(row) + "\n" for row in rows).encode())
        if dropped:
            warnings.warn(f"{self.path}: dropped a torn last line ({dropped} bytes) left by a killed run; its row "
                          "is computed again", RuntimeWarning, stacklevel=2)

    def scan(self, keys: Mapping[str, str] | None = None, indices: Container[int] | None = None) -> "RowSet":
        """Index the rows to read: with ``keys`` (method -> key) only rows of those methods carrying that key,
        with ``indices`` only those images; one row per (index, method), the first written."""
        return RowSet.build(self.files(), keys, indices)

    def finished(self, keys: Mapping[str, str] | None = None) -> dict[str, set[int]]:
        """Method -> the image indices already scored (with the method's current key, when ``keys`` is given)."""
        rowset = self.scan(keys)
        return {m: set(rowset.indices(m).tolist()) for m in rowset.methods()}

    def records(self) -> list[dict]:
        """Every complete line of every process's file, parsed, in write order, with no selection and no
        deduplication: for row files that are not per-(image, method) metric rows (the model-randomisation
        check's rows, one per image, method and step)."""
        found = []
        for path in self.files():
            with open(path, "rb") as f:
                found += [json.loads(line) for line in f if line.endswith(b"\n") and line.strip()]
        return found

    def read_all(self, keys: Mapping[str, str] | None = None, indices: Container[int] | None = None,
                 curves: bool = True) -> list[dict]:
        """Every selected row in memory (sorted by method, then index). Fine for small evaluations; large ones
        read :meth:`scan`'s :class:`RowSet` one method at a time."""
        return list(self.scan(keys, indices).rows(curves=curves))


def _parse(line: bytes, curves: bool) -> dict:
    """One row line -> dict, without the curves unless ``curves``. The curves are most of a line and written
    last (``"deletion_curve": [...], "insertion_curve": [...]}``): when the text after their start holds no
    other key (its only quoted string is "insertion_curve"), the line is parsed up to there, several times
    faster; anything else is parsed whole."""
    if not curves:
        cut = line.find(_CURVES_START)
        if cut > 0 and line.count(b'"', cut + len(_CURVES_START)) == 2:
            return json.loads(line[:cut] + b"}")
    row = json.loads(line)
    if not curves:
        for name in CURVES:
            row.pop(name, None)
    return row


class RowSet:
    """The selected rows of some row files, indexed: per method, the sorted image indices and where each row
    starts. Memory: 16 bytes per row (plus the file names); the rows themselves are read on demand."""

    def __init__(self, files: list[Path], index: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.files = list(files)
        self._index = index

    @classmethod
    def build(cls, files: list[Path], keys: Mapping[str, str] | None = None,
              indices: Container[int] | None = None) -> "RowSet":
        found: dict[str, tuple[array, array]] = {}
        skipped = []
        for number, path in enumerate(files):
            offset = 0
            with open(path, "rb") as f:
                for line in f:
                    start, offset = offset, offset + len(line)
                    if not line.endswith(b"\n"):  # the torn last line of a killed run
                        break
                    try:
                        row = _parse(line, curves=False)
                        index, method = int(row["index"]), row["method"]
                    except (ValueError, KeyError, TypeError):
                        skipped.append(f"{path.name} byte {start}")
                        continue
                    if keys is not None and (method not in keys or row.get("key") != keys[method]):
                        continue
                    if indices is not None and index not in indices:
                        continue
                    where = found.setdefault(sys.intern(method), (array("q"), array("q")))
                    where[0].append(index)
                    where[1].append(number << _OFFSET_BITS | start)
        if skipped:
            warnings.warn(f"{len(skipped)} unreadable row line(s) skipped (written by an older version, or the file "
                          f"was damaged): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                          RuntimeWarning, stacklevel=3)
        index = {}
        for method, (idx, loc) in found.items():
            idx, loc = np.frombuffer(idx, dtype=np.int64), np.frombuffer(loc, dtype=np.int64)
            order = np.lexsort((loc, idx))  # by index, then by (file, offset): the first written first
            idx, loc = idx[order], loc[order]
            first = np.ones(len(idx), dtype=bool)
            first[1:] = idx[1:] != idx[:-1]  # DDP padding and reruns may repeat a pair: the first written wins
            index[method] = (idx[first].copy(), loc[first].copy())
        return cls(files, index)

    def methods(self) -> list[str]:
        return sorted(self._index)

    def indices(self, method: str | None = None) -> np.ndarray:
        """Sorted image indices of ``method`` (of any method when None)."""
        if method is not None:
            return self._index.get(method, (np.zeros(0, dtype=np.int64),))[0]
        parts = [idx for idx, _ in self._index.values()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return sum(len(idx) for idx, _ in self._index.values())

    def of(self, method: str, curves: bool = False) -> Iterator[dict]:
        """The rows of ``method`` by image index; without the two curves unless ``curves`` (they are most of a
        row's memory)."""
        if method not in self._index:
            return
        with contextlib.ExitStack() as stack:
            handles: dict[int, Any] = {}
            for loc in self._index[method][1].tolist():
                number, offset = loc >> _OFFSET_BITS, loc & ((1 << _OFFSET_BITS) - 1)
                if number not in handles:
                    handles[number] = stack.enter_context(open(self.files[number], "rb"))
                handles[number].seek(offset)
                row = _parse(handles[number].readline(), curves)
                yield {sys.intern(k): v for k, v in row.items()}  # one copy of each key name for all rows

    def rows(self, curves: bool = True) -> Iterator[dict]:
        """Every row, sorted by method then image index."""
        for method in self.methods():
            yield from self.of(method, curves=curves)
