"""Memory gauges for the Run tab: the machine's RAM (psutil) and each NVIDIA GPU's memory (NVML), as bars.

They show the whole machine, not only the trainer: what matters to a user watching an 8 GB card is how close
the card is to full, whoever fills it. The trainer's own peak per step stays in the progress line.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from ui.gpus import list_gpus

WARN_SHARE = 0.90  # a bar turns red above this share
MACHINE_RAM = "machine RAM (all programs)"  # apart from the progress line's "trainer RAM"


@dataclass(frozen=True)
class Gauge:
    label: str
    used_gib: float
    total_gib: float

    @property
    def share(self) -> float:
        return self.used_gib / self.total_gib if self.total_gib > 0 else 0.0


def read_gauges(nvml: Any = None, memory: Any = None) -> list[Gauge]:  # noqa: ANN401 - stand-ins in tests
    """System RAM first, then one gauge per GPU. `nvml`/`memory`: pynvml and psutil.virtual_memory() stand-ins."""
    if memory is None:
        import psutil

        memory = psutil.virtual_memory()
    gauges = [Gauge(MACHINE_RAM, (memory.total - memory.available) / 2**30, memory.total / 2**30)]
    for gpu in list_gpus(nvml):
        gauges.append(Gauge(f"GPU {gpu.index} · {gpu.name} (all programs)", gpu.used_gib, gpu.total_gib))
    return gauges


def gauges_html(gauges: list[Gauge]) -> str:
    rows = []
    for gauge in gauges:
        percent = min(100.0, 100.0 * gauge.share)
        colour = "#d9534f" if gauge.share > WARN_SHARE else "#5b8def"
        rows.append(
            f'<div class="studio-gauge" title="{html.escape(gauge.label)}">'
            f'<span style="display:inline-block;width:16em">{html.escape(gauge.label)}</span>'
            f'<span style="display:inline-block;width:40%;height:0.9em;background:#ddd;vertical-align:middle">'
            f'<span style="display:block;height:100%;width:{percent:.1f}%;background:{colour}"></span></span>'
            f" {gauge.used_gib:.1f} / {gauge.total_gib:.1f} GiB ({percent:.0f} %)</div>")
    if len(gauges) == 1:
        rows.append("<div>No NVIDIA GPU found: nothing to show for VRAM.</div>")
    return "".join(rows)
