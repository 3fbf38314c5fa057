"""This machine's NVIDIA GPUs as NVML sees them (no torch): the Run tab's gauges and the "Several GPUs" section
read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML's index, which is the PCI bus order (the launch sets CUDA_DEVICE_ORDER to match)
    name: str
    total_gib: float
    used_gib: float = 0.0

    def label(self) -> str:
        return f"GPU {self.index}: {self.name}, {self.total_gib:.0f} GiB ({self.used_gib:.1f} GiB in use)"


def _gib(value: Any) -> float:  # noqa: ANN401 - NVML's integers
    return float(value or 0) / 2**30


def list_gpus(nvml: Any = None) -> list[Gpu]:  # noqa: ANN401 - the pynvml module or a stand-in
    """This machine's NVIDIA GPUs as NVML sees them; [] without a driver (or nvidia-ml-py). `nvml`: the pynvml
    module (tests pass a stand-in)."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError or a missing library: no NVIDIA GPU here
        return []
    gpus = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(index, name.decode() if isinstance(name, bytes) else str(name), _gib(memory.total),
                            _gib(getattr(memory, "used", 0))))
    except Exception:  # noqa: BLE001 - a driver that answers init but not every query: the GPUs read so far
        pass
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - shutting down is best effort
            pass
    return gpus
