"""Every benchmark shares one setup for threads, clock, device and synchronised timing
(saliency_lab.core.timing): its parser takes the shared --device/--threads/--clock, and it keeps no private
copy of that setup (its own thread count, CPU clock or load average)."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                    if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_uses_the_shared_timing_setup(name):
    module = importlib.import_module(f"benchmarks.{name}")
    if not callable(getattr(module, "main", None)):
        pytest.skip("no main")
    source = inspect.getsource(module)
    assert "saliency_lab.core.timing" in source and "add_timing_arguments(parser" in source
    assert "stopwatch_from_args(" in source and ".header()" in source
    for private in ("os.getloadavg", "set_num_threads", "process_time", "perf_counter"):
        assert private not in source, f"benchmarks/{name}.py has its own {private}"
