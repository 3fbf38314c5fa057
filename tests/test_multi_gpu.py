"""Several processes: `accelerate launch` with two gloo processes on the CPU, as the app would start it.

Three launches, each compared with something that must come out the same:
- ddp, 2 processes, batch 2, accumulation 1, block swap and offloaded checkpointing (the flat gradient
  all-reduce) == one process in this test, batch 2, accumulation 2: the same global batch, data order, noise and
  timesteps, so the LoRA and the losses agree to float rounding (ATOL; on this CPU they are bitwise equal);
- fsdp, 2 processes, fused backward (the per-parameter all-reduce in the hook) and offloaded checkpointing,
  sampling and evaluating (every rank takes part in each forward), stopped by the stop file after a few steps,
  then resumed to the same step: == the ddp run. So FSDP, the stop file and resume are each checked against an
  independent run.
`train.max_grad_norm = 0` everywhere: fused backward clips per parameter, the plain step globally. Every run
evaluates a held-out image each step (rank 0 alone under ddp); sampling draws nothing the training uses.
Runtime: about 25-35 s per launch on 2 cores (each process imports torch and diffusers), plus the demo fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, python_env
from safetensors.torch import load_file

from trainer import distributed
from trainer.checkpoint import load_training_state, saved_states
from trainer.distributed import Distributed, launch_command, request_stop
from trainer.estimator.auto import choose_mode
from trainer.estimator.plans import mode_problems
from trainer.events import EvalLoss, Progress, RunFinished, SampleSaved
from trainer.runners.launch import EventsFollower
from trainer.session import Session
from trainer.spec import load_spec, parse_spec, resolve_paths

ACCELERATE = Path(ROOT) / ".venv" / "bin" / "accelerate"
ATOL = 1e-6  # fp32 sums of two gradients in another order; observed 0
COMMON = ["train.max_grad_norm=0", "lowvram.strategy='aggressive'", "data.eval_holdout=1", "train.eval_every_steps=1"]
DDP = [*COMMON, "sample.prompts=[]", "train.distributed='ddp'", "lowvram.fused_backward=false"]
# aggressive: fused backward; no block swap under FSDP. One sample at the end of each run.
FSDP = [*COMMON, 'sample.prompts=["shapez a red circle"]', "sample.steps=2", "sample.every_steps=0",
        "train.distributed='fsdp'"]
STOP_AFTER = 2  # the stop file is written once this step is reported
MORE = 2  # steps trained after the stop


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(demo_dir: Path, out: Path, settings: list[str], resume: bool = False,
            stop_at: int | None = None) -> subprocess.CompletedProcess:
    """Two processes through the command the app uses; with `stop_at`, the stop file once that step is logged."""
    command = launch_command(demo_dir / "job.toml", 2, resume=resume, port=_free_port(),
                             overrides=[*settings, f"output.dir='{out}'"])
    command[0] = str(ACCELERATE) if ACCELERATE.exists() else command[0]
    env = {**python_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while stop_at is not None and process.poll() is None and time.monotonic() < deadline:
        if max(_progress_steps(out), default=0) >= stop_at:
            request_stop(out)
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _progress_steps(out: Path) -> list[int]:
    events = out / "events.jsonl"
    if not events.exists():
        return []
    steps = []
    for line in events.read_text().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if data.get("event") == "progress":
            steps.append(data["step"])
    return steps


@pytest.fixture(scope="module")
def runs(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stopped and resumed fsdp run, the unbroken ddp run to the same step, and one process."""
    fsdp_out, ddp_out, single_out = (tmp_path_factory.mktemp(name) for name in ("fsdp", "ddp", "single"))
    started = time.monotonic()
    stopped = _launch(demo_dir, fsdp_out, [*FSDP, "train.max_steps=200"], stop_at=STOP_AFTER)
    stopped_events = EventsFollower(fsdp_out / "events.jsonl").read()
    stop_step = stopped_events[-1].step
    steps = stop_step + MORE
    resumed = _launch(demo_dir, fsdp_out, [*FSDP, f"train.max_steps={steps}"], resume=True)
    unbroken = _launch(demo_dir, ddp_out, [*DDP, f"train.max_steps={steps}"])
    launches = time.monotonic() - started
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [*DDP, f"train.max_steps={steps}",
                                                          "train.gradient_accumulation=2",
                                                          f"output.dir='{single_out}'"]), demo_dir)
    single = Session(spec)
    try:
        single.run()
    finally:
        single.end()
    return {"fsdp": fsdp_out, "ddp": ddp_out, "single": single_out, "steps": steps, "stop_step": stop_step,
            "stopped_events": stopped_events, "stopped": stopped, "resumed": resumed, "unbroken": unbroken,
            "single_losses": single.losses, "launch_seconds": launches}


def _assert_same_lora(a: Path, b: Path) -> None:
    left, right = load_file(a / "demo_lora.safetensors"), load_file(b / "demo_lora.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=ATOL)


def _final_losses(out: Path, steps: int) -> list[float]:
    return load_training_state(dict(saved_states(out))[steps])["losses"]


def test_two_processes_train_the_lora_of_one_with_twice_the_accumulation(runs: dict) -> None:
    _assert_same_lora(runs["ddp"], runs["single"])
    assert _final_losses(runs["ddp"], runs["steps"]) == pytest.approx(runs["single_losses"], abs=ATOL, rel=0)
    print(f"three 2-process launches took {runs['launch_seconds']:.0f} s")


def test_only_rank_zero_reports_and_writes(runs: dict) -> None:
    out, steps = runs["ddp"], runs["steps"]
    events = EventsFollower(out / "events.jsonl").read()
    kinds = [type(event).__name__ for event in events]
    assert kinds.count("RunStarted") == 1 and kinds.count("RunFinished") == 1 and kinds.count("LoraSaved") == 1
    assert [event.step for event in events if isinstance(event, Progress)] == list(range(1, steps + 1))
    assert [event.step for event in events if isinstance(event, EvalLoss)] == list(range(1, steps + 1))
    assert any("distributed: 2 processes, ddp" in getattr(event, "message", "") for event in events)
    assert sorted(p.name for p in out.iterdir()) == ["demo_lora.safetensors", "events.jsonl", "job.resolved.toml",
                                                     "state"]
    assert runs["unbroken"].stdout.count("run completed at step") == 1  # the console of rank 1 stays quiet


def test_stop_file_stops_both_ranks_with_the_state_saved(runs: dict) -> None:
    events, stop_step = runs["stopped_events"], runs["stop_step"]
    finished = [event for event in events if isinstance(event, RunFinished)]
    assert len(finished) == 1 and finished[0].status == "stopped"
    assert STOP_AFTER <= stop_step < 200
    assert "fsdp" in next(e.message for e in events if "distributed:" in getattr(e, "message", ""))
    assert [event.step for event in events if isinstance(event, EvalLoss)] == list(range(1, stop_step + 1))
    assert [event.step for event in events if isinstance(event, SampleSaved)] == [stop_step]
    # both processes ended by themselves (exit code 0 checked), after the state of the stop step was written
    assert stop_step in dict(saved_states(runs["fsdp"]))


def test_fsdp_resumed_after_the_stop_matches_the_unbroken_run(runs: dict) -> None:
    _assert_same_lora(runs["fsdp"], runs["ddp"])
    steps = runs["steps"]
    assert _final_losses(runs["fsdp"], steps) == pytest.approx(_final_losses(runs["ddp"], steps), abs=ATOL, rel=0)
    assert not (runs["fsdp"] / distributed.STOP_FILE).exists()  # the resumed run cleared the stale stop file
    assert sorted(p.name for p in (runs["fsdp"] / "samples").iterdir()) == [
        f"step{runs['stop_step']:06d}_0.png", f"step{steps:06d}_0.png"]


# ---------------------------------------------------------------------- one process, and the torch-free parts


def test_stop_file_stops_a_single_process_run(demo_dir: Path, tmp_path: Path) -> None:
    spec = resolve_paths(load_spec(demo_dir / "job.toml", ["sample.prompts=[]", "train.max_steps=50",
                                                          f"output.dir='{tmp_path}'"]), demo_dir)

    def emit(event: object) -> None:
        if isinstance(event, Progress) and event.step == 2:
            request_stop(tmp_path)

    session = Session(spec, emit=emit)
    try:
        session.run()
    finally:
        session.end()
    assert session.step == 2 and [step for step, _ in saved_states(tmp_path)] == [2]


def _job(flavour: str, **train: object) -> object:
    return parse_spec({"model": {"family": "flux2", "flavour": flavour}, "train": train,
                       "data": {"datasets": [{"path": "x"}], "resolution": 1024}})


def test_auto_shards_the_base_only_when_one_gpu_cannot_hold_it_and_n_can() -> None:
    assert choose_mode(_job("klein-base-9b"), 1, 16)[0] == "single"
    assert choose_mode(_job("klein-base-9b"), 2, 24)[0] == "ddp"  # fits one 24 GiB GPU
    assert choose_mode(_job("klein-base-9b"), 2, 16)[0] == "fsdp"
    assert choose_mode(_job("dev"), 2, 80)[0] == "ddp"
    assert choose_mode(_job("dev"), 4, 24)[0] == "fsdp"
    mode, why = choose_mode(_job("dev"), 2, 24)  # 32B split two ways still overflows 24 GiB: swap instead
    assert mode == "ddp" and "even split 2 ways" in why
    assert choose_mode(_job("dev"), 2, None)[0] == "ddp"
    assert choose_mode(_job("klein-base-9b", distributed="fsdp"), 2, 80) == ("fsdp", "chosen in the job")


def test_fsdp_refuses_what_it_cannot_shard() -> None:
    quantised = parse_spec({"model": {"family": "flux2", "flavour": "dev", "base_precision": "nf4"},
                            "data": {"datasets": [{"path": "x"}]}, "lowvram": {"blocks_to_swap": 4}})
    problems = mode_problems(quantised, "fsdp")
    assert len(problems) == 2 and "nf4" in problems[0] and "blocks_to_swap" in problems[1]
    assert mode_problems(quantised, "ddp") == []
    assert choose_mode(quantised, 2, 24)[0] == "ddp"


def test_batches_are_dealt_round_robin_and_every_draw_happens_on_every_rank() -> None:
    drawn: list[int] = []

    def draws() -> object:
        for index in range(6):
            drawn.append(index)
            yield index

    assert list(Distributed(rank=1, world_size=2).my_share(draws())) == [1, 3, 5]
    assert drawn == list(range(6))
    assert list(Distributed().my_share(range(3))) == [0, 1, 2]


def test_launch_command_is_what_the_app_runs() -> None:
    command = launch_command("job.toml", 4, resume=True, overrides=["train.max_steps=10"], port=29600)
    assert command[:5] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "4"]
    assert command[command.index("-m"):] == ["-m", "trainer", "train", "job.toml", "--no-progress",
                                             "--set", "train.max_steps=10", "--resume"]
    assert command[command.index("--main_process_port") + 1] == "29600"
    assert os.sep not in distributed.STOP_FILE
