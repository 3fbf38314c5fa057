"""Several processes, one per GPU, started by `accelerate launch --multi_gpu --num_processes N -m trainer train`.

The session asks this module a few things and otherwise runs as it does alone:

- Who am I: `start(spec)` joins the process group accelerate's launcher set up (through accelerate's
  `PartialState`, which picks NCCL on GPUs and gloo on CPUs and binds each process to its GPU) and decides the
  mode: `ddp` (every GPU holds the whole frozen base) or `fsdp` (the frozen base split over the GPUs); one
  process is `single` and every call below is a no-op.
- Data: every rank keeps the same generator and the same batch order (same seed) and draws the noise,
  timesteps and caption dropout of every micro-batch of the global step, in the order one process would; a rank
  computes only its share (micro-batch j goes to rank j mod N). N processes with batch b and accumulation a
  therefore train on exactly the batches, noise and timesteps of one process with batch b and accumulation a·N.
- Gradients: only the LoRA's. They are averaged with plain `all_reduce` once the last micro-batch's backward is
  done, not by wrapping the transformer in DistributedDataParallel, which would fight the low-VRAM techniques:
  its reducer writes the averaged gradients at the end of the backward, after fused backward
  (`lowvram.fused_backward`) has already stepped each parameter on its local gradient in the post-accumulate
  hook; it broadcasts every parameter and buffer of the wrapped module when wrapping (the whole frozen base,
  block swap's streamed weights included); and it allows a nested backward, which our offloaded checkpointing
  runs per block, only with `static_graph`. The price: the all-reduce follows the backward instead of
  overlapping with it, which for a LoRA's few gradients is small. With fused backward the average happens in
  a post-accumulate hook registered before the optimiser's, so each parameter is averaged right before it is
  stepped.
- FSDP2 (`fully_shard`) splits the frozen base block by block and gathers a block's weights just in time for
  its forward (and the recomputation and backward); the LoRA parameters are left out of FSDP (`ignored_params`)
  so they stay whole on every rank: the all-reduce above, the optimisers, fused backward, checkpointing and
  saving work unchanged, and rank 0 holds the complete adapter to save without a gather. Block swap is off
  under FSDP (a rank holds 1/N of each block already, and the host would otherwise hold N copies). Quantised
  bases keep their weights in buffers, which FSDP does not shard: they are refused (they fit one GPU anyway).
- Caches: each rank needs every latent (any batch can land on any rank). With a disk cache rank 0 fills it
  first while the others wait at a barrier, then they read it warm (skipping the text encoders); with caches
  in memory every rank computes its own, at the same time.
- Output: rank 0 alone writes events.jsonl, samples, LoRA files and states; the others emit nothing.
- Control: rank 0 reads the app's commands and the stop file `output.dir/STOP` once per step and broadcasts
  the decision, so every rank stops (and samples, and saves) after the same step.
- Resume: the saved state holds rank 0's RNG where one process keeps it (a single process can resume it) and,
  under `ranks`, every rank's own global and TREAD RNG (dropout and TREAD draw per rank); the shared generator
  and the batch order are the same on every rank and saved once.

The mode itself is decided by `choose_mode` in trainer/estimator/auto.py, which the memory estimator uses too
(so an estimate for N GPUs assumes the mode the run picks). Torch is imported inside the functions: `choose_mode`
and the launch helpers serve the torch-free app.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from trainer.estimator.auto import choose_mode  # torch-free: shared with the memory estimator
from trainer.estimator.plans import LowVramPlan, mode_problems, plan_under
from trainer.spec import JobSpec

if TYPE_CHECKING:
    import torch

STOP_FILE = "STOP"
# Rank 0 may fill a disk cache of a large dataset while the others wait at a barrier: the default (10-30 min)
# is too short for that. A process that dies is noticed by the launcher, which ends the others, so a long
# timeout does not leave a crashed run hanging.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)
# Gradients are averaged in flat buckets of at most this many elements: one collective per bucket instead of one
# per tensor, without doubling the memory of a large adapter's gradients at once.
BUCKET_ELEMENTS = 32 * 2**20
# Ranks other than 0 draw dropout and TREAD from streams of their own: seed + RANK_SEED_STRIDE * rank.
RANK_SEED_STRIDE = 1_000_003

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch_command(job: str | Path, processes: int, *, resume: bool = False, overrides: Sequence[str] = (),
                   port: int | None = None) -> list[str]:
    """The command line that trains `job` on `processes` GPUs of this machine (run it from the project root,
    with the project's environment). Follow it through output.dir/events.jsonl; stop it with `request_stop`.
    `port`: the rendezvous port (default 29500); two runs at once need different ones."""
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]  # the session sets its own precision
    if port is not None:
        command += ["--main_process_port", str(port)]
    command += ["-m", "trainer", "train", str(job), "--no-progress"]
    for override in overrides:
        command += ["--set", override]
    return command + (["--resume"] if resume else [])


def stop_file(output_dir: str | Path) -> Path:
    return Path(output_dir) / STOP_FILE


def request_stop(output_dir: str | Path) -> Path:
    """Ask a run in another process to stop after its current step (and save the LoRA and state)."""
    path = stop_file(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@dataclass
class Distributed:
    """This process's place in the run; a single process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    mode: str = "single"
    reason: str = "one process"
    device: torch.device | None = None  # this rank's device; None: the session picks one
    problems: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: no rank can run the transformer alone, so every rank takes part in each forward."""
        return self.mode == "fsdp"

    def describe(self) -> str:
        return f"{self.world_size} processes, {self.mode} ({self.reason})"

    # ------------------------------------------------------------------ setup

    def adjust_plan(self, plan: LowVramPlan) -> LowVramPlan:
        """The low-VRAM plan under this mode: FSDP turns block swap off (mode_problems refuses an explicit one).
        The estimator assumes the same plan (trainer/estimator/plans.py)."""
        return plan_under(self.mode, plan)

    def rank_seed(self, seed: int) -> int:
        """The seed of a per-rank stream: rank 0 keeps the single-process seed."""
        return seed + RANK_SEED_STRIDE * self.rank

    def seed_rank(self, seed: int) -> None:
        """Give ranks other than 0 their own global RNG (dropout), once every rank built the same adapter."""
        if self.rank:
            import torch

            torch.manual_seed(self.rank_seed(seed))

    def main_first(self, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """Rank 0 runs the block while the others wait, then the others run it (to read what rank 0 wrote)."""
        if self.world_size == 1 or not enabled:
            return contextlib.nullcontext()
        from accelerate import PartialState

        return PartialState().main_process_first()

    def shard_transformer(self, transformer: Any, blocks: Sequence[Any]) -> None:
        """FSDP2: every block's frozen weights, then the rest of the transformer's, split over the ranks; the
        LoRA parameters stay whole on every rank (moved to this rank's device)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        assert self.device is not None
        lora = {p for p in transformer.parameters() if p.requires_grad}
        for param in lora:
            param.data = param.data.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in blocks:  # one unit per block: only one block's whole weights exist at a time
            fully_shard(block, mesh=mesh, ignored_params=lora)
        fully_shard(transformer, mesh=mesh, ignored_params=lora)

    def reshard(self, transformer: Any) -> None:
        """FSDP: free the gathered weights on every rank alike. Reading a state dict (rank 0 alone, to save the
        LoRA) reshards that rank's modules; after a no-grad forward (sampling, evaluation) the root stays gathered,
        so without this rank 0 would gather it again in the next forward while the others would not."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in transformer.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # ------------------------------------------------------------------ training steps

    def my_share(self, items: Iterable[T]) -> Iterator[T]:
        """Items j with j mod world_size == rank; every item is still produced, so draws made while producing
        them advance identically on every rank."""
        for index, item in enumerate(items):
            if index % self.world_size == self.rank:
                yield item

    def gradient_sync(self, params: Sequence[torch.nn.Parameter], per_parameter: bool) -> GradientSync:
        """Averages the gradients of `params` over the ranks; rank 0's values are broadcast first so every rank
        starts from the same adapter. Create it before a fused optimiser (its hooks must run first)."""
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            with torch.no_grad():
                for param in params:
                    dist.broadcast(param.data, src=0)
        return GradientSync(list(params), self.world_size, per_parameter, self.device)

    def broadcast_flags(self, flags: Sequence[bool]) -> list[bool]:
        """Rank 0's flags on every rank."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.broadcast(tensor, src=0)
        return [bool(v) for v in tensor.tolist()]

    # ------------------------------------------------------------------ state for exact resume

    def rng_states(self, tread_generator: torch.Generator) -> list[dict[str, Any]]:
        """Every rank's own RNG (global CPU and CUDA streams, TREAD), gathered on all ranks; a collective."""
        import torch

        own = {"torch_rng": torch.get_rng_state(), "tread_generator": tread_generator.get_state(),
               "cuda_rng": torch.cuda.get_rng_state(self.device) if self._cuda() else None}
        if self.world_size == 1:
            return [own]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, own)
        return [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()} for state in gathered]

    def restore_rng(self, state: dict[str, Any], tread_generator: torch.Generator) -> str | None:
        """This rank's RNG from a saved state's `ranks` (one process reads the top-level entries, rank 0's);
        returns a warning when the state was saved by another number of processes."""
        import torch

        ranks = state.get("ranks", [])
        if self.world_size > 1 and self.rank < len(ranks):  # a rank the state has no stream for keeps its own
            own = ranks[self.rank]
            torch.set_rng_state(own["torch_rng"])
            tread_generator.set_state(own["tread_generator"])
            if own.get("cuda_rng") is not None and self._cuda():
                torch.cuda.set_rng_state(own["cuda_rng"], self.device)
        saved = int(state.get("world_size", 1))
        if saved == self.world_size:
            return None
        return (f"saved by {saved} process(es), resumed by {self.world_size}: the global batch changes, so this "
                "is not an exact continuation")

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"


class GradientSync:
    """Averages LoRA gradients over the ranks: after the backward in flat buckets, or per parameter in a
    post-accumulate hook when a fused optimiser steps each parameter inside the backward."""

    def __init__(self, params: list[torch.nn.Parameter], world_size: int, per_parameter: bool,
                 device: torch.device | None) -> None:
        self.params = params
        self.world_size = world_size
        self.per_parameter = per_parameter
        self.device = device
        self.stepping = True  # set by the session: the last micro-batch of the step is running
        self._handles = []
        if world_size > 1 and per_parameter:
            # Hooks run in registration order: this one averages before the fused optimiser's steps.
            # Every rank completes the gradients in the same order (the same graph), so the collectives match.
            self._handles = [p.register_post_accumulate_grad_hook(self._average_one) for p in params]

    def _average_one(self, param: torch.nn.Parameter) -> None:
        if self.stepping and param.grad is not None:
            import torch.distributed as dist

            dist.all_reduce(param.grad)
            param.grad.div_(self.world_size)

    def average(self, loss: float) -> float:
        """After the last micro-batch's backward: average the gradients (unless hooks did) and the loss."""
        if self.world_size == 1:
            return loss
        import torch
        import torch.distributed as dist

        if not self.per_parameter:
            for bucket in self._buckets():
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat.div_(self.world_size)
                offset = 0
                for grad in bucket:
                    grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                    offset += grad.numel()
        total = torch.tensor([loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def _buckets(self) -> list[list[torch.Tensor]]:
        """The gradients grouped by device and dtype, each group cut into buckets of BUCKET_ELEMENTS."""
        import torch

        groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
        for param in self.params:
            if param.grad is None:  # every rank must reduce the same tensors; a missing gradient counts as zero
                param.grad = torch.zeros_like(param)
            groups.setdefault((param.grad.device, param.grad.dtype), []).append(param.grad)
        buckets: list[list[torch.Tensor]] = []
        for grads in groups.values():
            current: list[torch.Tensor] = []
            size = 0
            for grad in grads:
                if current and size + grad.numel() > BUCKET_ELEMENTS:
                    buckets.append(current)
                    current, size = [], 0
                current.append(grad)
                size += grad.numel()
            buckets.append(current)
        return buckets

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class StepCommands:
    """The session's commands, seen alike by every rank.

    One process: the app's commands, plus the stop file output.dir/STOP (for a run in a subprocess), read live.
    Several: rank 0 reads both at `poll()`, once per step, and broadcasts stop, sample-now and save-now; every
    rank then answers from that decision until the next poll.
    """

    def __init__(self, inner: Any, stop_path: Path, dist: Distributed) -> None:
        self.inner = inner
        self.stop_path = stop_path
        self.dist = dist
        self._stop = self._sample = self._save = False

    def clear_stale_stop(self) -> None:
        """A stop file left by an earlier run would stop this one at once."""
        if self.dist.is_main:
            self.stop_path.unlink(missing_ok=True)

    def _local_stop(self) -> bool:
        return bool(self.inner.stop_requested) or self.stop_path.exists()

    def poll(self) -> bool:
        """Whether to stop before the next step; a collective with several processes."""
        if self.dist.world_size == 1:
            return self._local_stop()
        flags = [False, False, False]
        if self.dist.is_main:
            flags = [self._local_stop(), self.inner.take_sample_request(), self.inner.take_save_request()]
        self._stop, self._sample, self._save = self.dist.broadcast_flags(flags)
        return self._stop

    @property
    def stop_requested(self) -> bool:
        return self._local_stop() if self.dist.world_size == 1 else self._stop

    def take_sample_request(self) -> bool:
        if self.dist.world_size == 1:
            return bool(self.inner.take_sample_request())
        requested, self._sample = self._sample, False
        return requested

    def take_save_request(self) -> bool:
        if self.dist.world_size == 1:
            return bool(self.inner.take_save_request())
        requested, self._save = self._save, False
        return requested


def start(spec: JobSpec, gpu_vram_gib: float | None = None) -> Distributed:
    """This process's place: rank 0 of 1 unless a launcher started several, in which case the process group is
    joined (once per process) and the mode chosen. `gpu_vram_gib`: for a single process, unused."""
    world = launched_world_size()
    if world <= 1:
        return Distributed()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # ACCELERATE_USE_CPU=true (what `accelerate launch --cpu` sets) keeps the processes on the CPU with gloo
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)
    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    if gpu_vram_gib is None and device.type == "cuda":
        gpu_vram_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    mode, reason = choose_mode(spec, state.num_processes, gpu_vram_gib)
    return Distributed(rank=state.process_index, world_size=state.num_processes, mode=mode, reason=reason,
                       device=device, problems=mode_problems(spec, mode))


def shutdown() -> None:
    """Leave the process group (at the end of a launched run), so the backend closes cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
