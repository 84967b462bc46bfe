"""What machine a number was measured on: CPU model and cores, the accelerator, the torch build, and what the CPU
computes natively (bf16 through oneDNN, AMX, AVX-512). Recorded beside every result and benchmark figure, because
speed and, at bf16, the numbers themselves depend on it."""
from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name"; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def device_name(device: torch.device | str) -> str:
    """``"cpu: <model>"`` or ``"cuda: <GPU name>"``: the processor a pass on ``device`` runs on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {cpu_model()}"
    return device.type


def describe(device: torch.device | str = "cpu") -> dict:
    """Plain-data description of this machine and of ``device``: CPU model, logical cores, the CPU capability
    torch dispatches to (``ATEN_CPU_CAPABILITY`` can lower it), whether oneDNN computes bf16 natively, the
    accelerator, and the torch / CUDA versions."""
    device = torch.device(device)
    flags = cpu_flags()
    out = {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_bf16_native": bool(torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
           "cpu_amx": "amx_bf16" in flags, "cpu_avx512": "avx512f" in flags,
           "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
           "device": str(device), "device_name": device_name(device),
           "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        out["cuda_bf16"] = torch.cuda.is_bf16_supported()
    return out


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (a figure measured beside other jobs says so)."""
    try:
        return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"
