"""Nothing lost, nothing torn: atomic writes, torn-line-safe appends, one process per folder, and the
keyed, indexed reading of per-image rows (core/files.py, metrics/rows.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings

import pytest

from saliency_lab.core.files import FolderBusyError, FolderLock, atomic_write, atomic_write_json, safe_name
from saliency_lab.metrics.report import write_reports
from saliency_lab.metrics.rows import RowStore, content_key
from saliency_lab.metrics.suite import METRIC_NAMES, EvaluationSettings
from tests.conftest import subprocess_env

# A child process that may write at most LIMIT bytes per file (a full disk, or a kill, in the middle of a
# write), then runs CODE; SIGXFSZ ignored so that the write fails with an error instead of killing it.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
{code}
"""


def _run_limited(limit: int, code: str, cwd) -> subprocess.CompletedProcess:
    script = _LIMITED.format(limit=limit, code=textwrap.dedent(code))
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')
    def crash_half_way(tmp):
        tmp.write_text('{"half')
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        atomic_write(path, crash_half_way)
    assert path.read_text() == '{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    atomic_write(path, "new")
    assert path.read_text() == "new" and oct(path.stat().st_mode & 0o777) != "0o600"


def _row(index, method, key=None, value=0.5, curve=5):
    row = {"index": index, "method": method, "label": index % 3, "target": index % 3, "seconds": 0.1,
           "forwards": 8.0, "backwards": 0.0, **{k: value for k in METRIC_NAMES},
           "deletion_curve": [value] * curve, "insertion_curve": [value] * curve}
    return row if key is None else {**row, "key": key}


def test_reports_on_a_full_disk_keep_the_old_reports(tmp_path, repo_root):
    """results.json, results.csv and summary.md: a write that fails half-way (here: the file size limit, as a
    full disk) leaves the previous file whole. Before, results.json was truncated first and then cut short."""
    old = {"results.json": '{"old": true}', "summary.md": "old summary", "results.csv": "index\n"}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    rows = [_row(i, m) for i in range(300) for m in ("a", "b")]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    header = {"protocol": EvaluationSettings().resolve(32).to_dict(32), "blackbox": "x", "data": {"name": "d"}}
    (tmp_path / "header.json").write_text(json.dumps(header))
    done = _run_limited(4096, f"""
        import json, pathlib
        from saliency_lab.metrics.report import write_reports
        out = pathlib.Path({str(tmp_path)!r})
        write_reports(json.loads((out / "rows.json").read_text()), ["a", "b"], json.loads((out / "header.json").read_text()), out)
    """, repo_root)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    for name, text in old.items():
        assert (tmp_path / name).read_text() == text, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    write_reports(rows, ["a", "b"], header, tmp_path)  # without the limit: the new reports
    assert json.loads((tmp_path / "results.json").read_text())["num_images"] == 300


def test_append_after_a_torn_line_keeps_every_row(tmp_path):
    store = RowStore(tmp_path)
    store.append([_row(0, "a"), _row(1, "a")])
    with open(store.path, "a") as f:  # a kill in the middle of appending row 2
        f.write(json.dumps(_row(2, "a"))[:40])
    assert sorted(r["index"] for r in store.read_all()) == [0, 1]  # the torn line is not a row
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.append([_row(2, "a"), _row(3, "a")])
    assert [r["index"] for r in store.read_all()] == [0, 1, 2, 3]  # before: row 2 glued onto the torn line, lost
    assert all(json.loads(line) for line in store.path.read_text().splitlines())
    assert any("torn last line" in str(w.message) for w in caught)


def test_a_write_cut_by_the_file_size_limit_then_resume(tmp_path, repo_root):
    """The torn line made for real: a child appends rows until the size limit cuts one; the next append
    (with room again) keeps every row."""
    done = _run_limited(3000, f"""
        from saliency_lab.metrics.rows import RowStore
        from tests.test_files import _row
        store = RowStore({str(tmp_path)!r})
        for i in range(100):
            store.append([_row(i, "a", curve=20)])
    """, repo_root)
    assert done.returncode != 0
    store = RowStore(tmp_path)
    assert not store.path.read_text().endswith("\n")  # cut inside a line
    kept = [r["index"] for r in store.read_all()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store.append([_row(i, "a", curve=20) for i in range(len(kept), len(kept) + 3)])
    assert [r["index"] for r in store.read_all()] == list(range(len(kept) + 3))


def test_rows_are_read_by_key_and_image_first_written_wins(tmp_path):
    old, new = content_key({"n_masks": 8}), content_key({"n_masks": 500})
    assert old != new and content_key({"b": 1, "a": [1, 2]}) == content_key({"a": [1, 2], "b": 1})
    RowStore(tmp_path, rank=0).append([_row(i, "rise", old, 0.1) for i in range(4)] + [_row(0, "grad", "g", 0.3)])
    RowStore(tmp_path, rank=1).append([_row(i, "rise", new, 0.9) for i in range(2)]
                                      + [_row(1, "rise", new, 0.7)])  # a repeated pair (DDP padding)
    store = RowStore(tmp_path)
    rowset = store.scan({"rise": new, "grad": "g"})
    assert rowset.methods() == ["grad", "rise"] and rowset.indices("rise").tolist() == [0, 1]
    assert [r["deletion"] for r in rowset.of("rise")] == [0.9, 0.9]  # the first written of index 1
    assert "deletion_curve" not in next(rowset.of("rise")) and "deletion_curve" in next(rowset.of("rise", True))
    assert store.finished({"rise": old}) == {"rise": {0, 1, 2, 3}}
    assert store.scan({"rise": old}, range(3)).indices().tolist() == [0, 1, 2]
    results = write_reports(store.scan({"rise": new, "grad": "g"}), ["rise", "grad"],
                            {"protocol": EvaluationSettings().resolve(32).to_dict(32), "blackbox": "x",
                             "data": {"name": "d"}}, tmp_path)
    assert results["num_images"] == 2 and results["methods"]["rise"]["deletion"] == pytest.approx(0.9)
    assert results["methods"]["grad"]["images"] == 1 and math.isclose(results["methods"]["grad"]["iou"], 0.3)


def test_unreadable_middle_lines_are_named(tmp_path):
    store = RowStore(tmp_path)
    store.path.write_text(json.dumps(_row(0, "a")) + "\n" + '{"index": 1, "meth' + json.dumps(_row(2, "a")) + "\n")
    with pytest.warns(RuntimeWarning, match=r"1 unreadable row line.*rows-rank0.jsonl byte"):
        assert [r["index"] for r in store.read_all()] == [0]


def test_second_lock_is_refused_and_a_dead_holder_leaves_no_stale_lock(tmp_path, repo_root):
    with FolderLock(tmp_path, "evaluate.py run"):
        with pytest.raises(FolderBusyError, match=r"in use by another evaluate.py run \(pid \d+ on "):
            FolderLock(tmp_path, "evaluate.py run").acquire()
    FolderLock(tmp_path).acquire().release()  # released
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from saliency_lab.core.files import FolderLock
        lock = FolderLock({str(tmp_path)!r}).acquire()  # held while referenced
        print("locked", flush=True)
        time.sleep(600)
    """)], cwd=repo_root, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid} "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: no clean-up code of the holder runs
        holder.wait()
    assert (tmp_path / ".lock").is_file()  # the file stays, but it is no lock any more
    FolderLock(tmp_path).acquire().release()


def test_every_json_record_is_strict_json(tmp_path):
    """atomic_write_json (run.json, randomisation.json, the callbacks' records, *_metrics.json) writes NaN and
    +-inf as null: Python's json reads NaN tokens, but browsers, jq and strict parsers refuse them."""
    path = atomic_write_json(tmp_path / "r.json", {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (2, "x")})
    strict = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert strict == {"a": None, "b": [None, None, 1.5], "c": [2, "x"]}


def test_safe_name_rule():
    for good in ("gradient", "rise_2k", "igos++", "a.b-c", "x" * 100):
        assert safe_name(good, "alias") == good
    for bad in ("", ".", "..", "../x", "/abs", "a/b", "a\\b", ".hidden", "a b", "a|b", "x" * 101, None, 3):
        with pytest.raises(ValueError, match=r"^alias .* cannot name a file"):
            safe_name(bad, "alias")
