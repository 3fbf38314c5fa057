"""How much one dataset upload through the page may hold: standard library only, so app.py's --help stays fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UploadLimits:
    """Per upload. A LoRA dataset is 10 to a few hundred images: 2 GiB holds 500 large JPEGs with room to spare,
    and 2000 files are 1000 images with their captions. Set at launch (--upload-max-mb, --upload-max-files)."""

    max_total_mb: int = 2048
    max_files: int = 2000

    @property
    def max_total_bytes(self) -> int:
        return self.max_total_mb * 1024 * 1024

    def describe(self) -> str:
        return f"{self.max_total_mb} MB and {self.max_files} files per upload"
