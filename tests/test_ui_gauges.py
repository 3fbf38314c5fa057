"""The Run tab's memory gauges: system RAM from psutil and each GPU from NVML, as bars."""

from __future__ import annotations

from types import SimpleNamespace

from ui.gauges import gauges_html, read_gauges


class _FakeNvml:
    """Two GPUs, one nearly full."""

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA GeForce RTX 3060 Ti" if handle == 0 else b"NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        total = (8 if handle == 0 else 24) * 2**30
        return SimpleNamespace(total=total, used=int(total * (0.95 if handle == 0 else 0.25)))


def test_ram_and_every_gpu_get_a_bar() -> None:
    memory = SimpleNamespace(total=32 * 2**30, available=8 * 2**30)
    gauges = read_gauges(_FakeNvml(), memory)
    assert [g.label for g in gauges] == ["machine RAM (all programs)",
                                         "GPU 0 · NVIDIA GeForce RTX 3060 Ti (all programs)",
                                         "GPU 1 · NVIDIA GeForce RTX 4090 (all programs)"]
    assert gauges[0].used_gib == 24.0 and gauges[0].total_gib == 32.0
    assert round(gauges[1].share, 2) == 0.95
    page = gauges_html(gauges)
    assert "24.0 / 32.0 GiB (75 %)" in page and "7.6 / 8.0 GiB (95 %)" in page
    assert page.count("#d9534f") == 1  # only the nearly full card is red


def test_without_a_gpu_says_so_and_reads_this_machine() -> None:
    class _NoDriver:
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    gauges = read_gauges(_NoDriver())
    assert len(gauges) == 1 and gauges[0].total_gib > 0
    assert "No NVIDIA GPU" in gauges_html(gauges)
