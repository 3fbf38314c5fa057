"""`lowvram.empty_cache_every`: hand the CUDA allocator's cached, unused blocks back to the driver every N steps.

PyTorch keeps freed GPU memory reserved for its next allocation; on a card shared with a desktop (or another
program) that reservation starves them. Releasing it costs the next step some fresh allocations. On the CPU
there is no allocator cache: the release is a no-op that is still counted, so the log says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheRelease:
    every: int  # 0: never
    device_type: str
    count: int = 0  # releases done
    released_bytes: int = 0  # reserved-but-unused bytes handed back, summed over the releases

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def release(self) -> int:
        """Empty the allocator cache now; returns the bytes handed back (0 on the CPU)."""
        self.count += 1
        if self.device_type != "cuda":
            return 0
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        freed = max(before - torch.cuda.memory_reserved(), 0)
        self.released_bytes += freed
        return freed

    def summary(self) -> str:
        """One line for the log at the end of training."""
        where = (f"{self.released_bytes / 2**30:.2f} GiB of cached GPU memory handed back in total"
                 if self.device_type == "cuda" else "no allocator cache on the CPU, nothing to hand back")
        return f"lowvram.empty_cache_every = {self.every}: released the cache {self.count} times ({where})"
