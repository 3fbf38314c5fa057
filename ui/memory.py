"""The memory side of the form in plain python (no gradio, no torch): the Low VRAM tab's resolved plan and live
verdict, and the Memory Estimator tab's totals, phase bars, strategy comparison and breakdown.

Everything here calls the estimator (trainer/estimator/), which is torch-free and takes a few milliseconds, so the
tabs can call it from `.change` handlers without ever blocking the page.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from trainer import registry
from trainer.estimator.auto import resolve_lowvram
from trainer.estimator.core import PHASES, Estimate, verdict
from trainer.estimator.job import estimate_job
from trainer.estimator.plans import LowVramPlan
from trainer.memory.strategies import CONCRETE
from trainer.profiles import UNKNOWN_USABLE_SHARE
from trainer.spec import JobSpec, SpecError
from ui import form
from ui.words import all_in_page_words

# One line per strategy, for the menu's help and the comparison table (trainer/memory/strategies.py has the bundles).
STRATEGY_HELP: dict[str, str] = {
    "auto": "the lightest bundle the estimator says fits the GPU memory planned for (or the detected GPU)",
    "none": "everything on the GPU, nothing recomputed: fastest, needs the most memory",
    "conservative": "gradient checkpointing on every block (~25% slower); text encoders streamed while caching",
    "aggressive": "+ half the blocks streamed from CPU memory, checkpoints offloaded, optimiser fused into "
                  "backward",
    "extreme": "every swappable block streamed, optimiser and text encoders on the CPU: the least VRAM, slowest",
}
PHASE_COLUMNS = ["phase", "part", "GiB"]
STRATEGY_COLUMNS = ["strategy", "VRAM (GiB)", "RAM (GiB)", "verdict", "plan"]
BREAKDOWN_COLUMNS = ["item", "GiB"]
CONTEXT_PART = "cuda context"
# The estimate gives each phase's total, and its breakdown itemises the training step only. Another phase shows
# the CUDA context (in every phase that uses the GPU) and the rest of its total as one part, unless the estimate
# carries that phase's own parts (a "parts" table in to_json, if the estimator grows one).
REST_PART = "models and working memory"
SETTING = re.compile(r"^[a-z_]+\.[a-z_]+ ")  # "section.key …": a suggested setting
NO_GPU = "no GPU detected"  # gpu_target's source on a CPU-only machine with no GPU size given: training on the CPU
ROUNDING_GIB = 0.01  # the estimate's figures are rounded to a few decimals; parts may overshoot by that much


@functools.lru_cache(maxsize=1)
def detected_vram_gib() -> float | None:
    """Usable memory of this machine's first NVIDIA GPU in GiB, found once; None without one.

    The detected hardware profile's (NVML, trainer/profiles.py) when there is one; else what nvidia-smi reports,
    less the share a desktop and the driver keep. The first GPU: the plan is per GPU, and the GPUs of one
    machine are normally the same model."""
    from ui.presets import detected_profile

    profile = detected_profile()
    if profile is not None:
        return profile.vram_gib or None
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        mib = float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return round(mib / 1024 * UNKNOWN_USABLE_SHARE, 1)


def gpu_target(spec: JobSpec, detected: float | None, given: Any = None) -> tuple[float | None, str]:  # noqa: ANN401
    """(GiB to judge against, where it came from): a size given here, else the job's lowvram.vram_gib, else the
    detected GPU; (None, why) when there is none. `given` 0 or empty counts as not given (a number box that the
    browser cannot leave empty)."""
    if given not in (None, "", 0):
        size = float(given)
        if size == spec.lowvram.vram_gib:
            return size, "GPU memory to plan for"
        return size, "detected GPU" if size == detected else "given here"
    if spec.lowvram.vram_gib:
        return spec.lowvram.vram_gib, "GPU memory to plan for"
    if detected:
        return detected, "detected GPU"
    return None, NO_GPU


def _peak_phase(result: Estimate) -> str:
    return max(result.phases, key=lambda name: result.phases[name].vram_gib)


def verdict_line(result: Estimate, gpu_gib: float | None, source: str, ram: str = "") -> str:
    """The verdict first ("fits", "tight", "will not fit", "no verdict"), then the figures and, `ram`, the RAM
    verdict of this machine (trainer/memory/system_ram.py): plain text, coloured by its first word in the tabs
    and read as it is through the API."""
    if gpu_gib is None and source == NO_GPU:
        return (f"no verdict — {result.ram_gib:.1f} GiB RAM; no GPU detected: the job trains on the CPU (to plan "
                "for a GPU, set the GPU memory to plan for on the Low VRAM tab)" + (f". {ram}" if ram else ""))
    figures = (f"{result.vram_gib:.1f} GiB VRAM at the peak ({_peak_phase(result)}), "
               f"{result.ram_gib:.1f} GiB RAM")
    ram = f". {ram}" if ram else ""
    if gpu_gib is None or result.verdict is None:
        return f"no verdict — {figures}; {source}: set the GPU memory to plan for (Low VRAM tab){ram}"
    return f"{result.verdict} — {figures}; {gpu_gib:g} GiB GPU ({source}){ram}"


def _available_ram() -> float:
    from trainer.memory.system_ram import available_ram_gib

    return available_ram_gib()


def ram_line(spec: JobSpec, plan: LowVramPlan, gpu_gib: float | None) -> str:
    """The RAM verdict against this machine's available RAM: first run and repeated runs, and when it will not
    fit the cheapest setting that does (the CLI refuses such a run unless --force)."""
    from trainer.memory.system_ram import ram_verdict

    return ram_verdict(spec, plan, gpu_gib).line()


def describe_plan(plan: LowVramPlan, on_cpu: bool = False) -> str:
    """The plan in words; on a CPU-only machine the "GPU" of a plan is the CPU, and it says so."""
    return cpu_words(plan.describe()) if on_cpu else plan.describe()


def cpu_words(text: str) -> str:
    """A plan's words for a CPU-only machine, where its "gpu" device is the CPU."""
    return text.replace("text encoders on gpu", "text encoders on the CPU (no GPU)")


def _plan_lines(plan: LowVramPlan, result: Estimate, on_cpu: bool = False) -> list[str]:
    """Markdown: the plan in words and, when the job does not fit, the estimator's suggestion."""
    lines = [f"**Plan:** {describe_plan(plan, on_cpu)}"]
    if result.suggestion:
        # settings ("lowvram.blocks_to_swap ≥ 16") as code, prose ("none of the supported changes…") as it is
        changes = [f"`{part}`" if SETTING.match(part) else part for part in result.suggestion.split("; ")]
        lines.append(f"**To fit:** {'; '.join(changes)}")
    return lines


def problems_line(problems: list[str], labels: Mapping[str, str] | None = None) -> str:
    """One message for a form the estimator cannot read, naming each bad field (as the page shows it, given the
    controls' `labels`)."""
    return "problems — " + "; ".join(all_in_page_words(problems, labels or {}))


# ---------------------------------------------------------------------- Low VRAM tab


@dataclass(frozen=True)
class LowVramCheck:
    """`line`: the verdict line (see verdict_line) or the problems; `plan`: markdown, the resolved plan in words
    and, when the job does not fit, the estimator's suggestion."""

    line: str
    plan: str
    ok: bool = True


def swap_bound(family: str, flavour: str, current: Any = 0) -> tuple[int, int]:  # noqa: ANN401
    """(the flavour's most blocks to swap, the slider value clipped to it); (0, 0) for an unknown flavour."""
    try:
        most = registry.get_flavour(family, flavour).max_blocks_to_swap
    except KeyError:
        return 0, 0
    try:
        value = int(current or 0)
    except (TypeError, ValueError):
        value = 0
    return most, max(0, min(value, most))


def largest_swap_bound() -> int:
    """The most blocks any flavour can swap: the slider's bound before the browser knows the flavour."""
    return max(flavour.max_blocks_to_swap for family in registry.FAMILIES.values()
               for flavour in family.flavours.values())


def check_lowvram(values: dict[str, Any], base: dict[str, Any] | None, detected: float | None,
                  labels: Mapping[str, str] | None = None) -> LowVramCheck:
    """The plan the form's job would run with and the estimator's verdict on it, against the GPU memory to plan
    for (else the detected GPU)."""
    try:
        spec = form.form_to_spec(values, base)
    except SpecError as exc:
        return LowVramCheck(problems_line(exc.problems, labels), "", ok=False)
    gpu_gib, source = gpu_target(spec, detected)
    plan = resolve_lowvram(spec, gpu_gib, ram_gib=_available_ram())
    result = estimate_job(spec, gpu_gib, plan=plan)
    return LowVramCheck(verdict_line(result, gpu_gib, source, ram_line(spec, plan, gpu_gib)),
                        "\n\n".join(_plan_lines(plan, result, source == NO_GPU)))


@dataclass(frozen=True)
class SwapSource:
    """Whether the blocks-on-disk controls apply to the plan the form's job would run with, and their help (or why
    they are greyed out): `swaps`: the plan swaps blocks (lowvram.swap_from applies); `reads_disk`: and they may
    wait on disk (lowvram.disk_read_gbps applies)."""

    swaps: bool
    reads_disk: bool
    swap_info: str
    gbps_info: str


SWAP_FROM_INFO = ("where swapped blocks wait: ram (pinned memory), disk (a block cache file beside the latents, read "
                  "ahead: RAM holds a few blocks); from strategy: ram, or disk when this machine's RAM needs it")
DISK_READ_INFO = ("the disk's read speed the estimate assumes for blocks on disk (GB/s, above 0 and at most 100); "
                  "empty: 3, a typical NVMe")


def swap_source(values: dict[str, Any], base: dict[str, Any] | None, detected: float | None) -> SwapSource | None:
    """The blocks-on-disk controls for the form's job (its resolved plan: a strategy may swap blocks with the slider
    untouched); None when the form has problems (the verdict names them)."""
    try:
        spec = form.form_to_spec(values, base)
    except SpecError:
        return None
    gpu_gib, _ = gpu_target(spec, detected)
    plan = resolve_lowvram(spec, gpu_gib, ram_gib=_available_ram())
    if not plan.blocks_to_swap:
        why = "no block is swapped in this job's plan (Block swap, or the strategy): nothing waits in RAM or on disk"
        return SwapSource(False, False, why, why)
    chosen = f" (this job: {plan.blocks_to_swap} blocks from {plan.swap_from})"
    if spec.lowvram.swap_from == "ram":
        return SwapSource(True, False, SWAP_FROM_INFO + chosen, "the swapped blocks wait in RAM: no disk is read")
    return SwapSource(True, True, SWAP_FROM_INFO + chosen, DISK_READ_INFO)


# ---------------------------------------------------------------------- Memory Estimator tab


@dataclass
class EstimatorReport:
    """Everything the estimator tab shows. `phase_rows` are (phase, part, GiB): one stacked bar per phase whose
    parts add up to the phase's VRAM; `strategy_rows` and `breakdown_rows` follow STRATEGY_COLUMNS and
    BREAKDOWN_COLUMNS."""

    line: str
    details: str = ""
    phase_rows: list[tuple[str, str, float]] = field(default_factory=list)
    strategy_rows: list[list[Any]] = field(default_factory=list)
    breakdown_rows: list[list[Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None  # the estimate's to_json(), for the API and the tests

    @property
    def ok(self) -> bool:
        return not self.problems


def _part_name(label: str) -> str:
    """"base weights (nf4, GPU)" → "base weights": the legend names the part, the table keeps the details."""
    return label.split(" (", 1)[0]


def phase_rows(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(phase, part, GiB) for every phase of an estimate's to_json(); each phase's parts add up to its VRAM.

    The training step is itemised by the breakdown when that adds up to it; a phase with its own "parts" by
    those; any other phase is the CUDA context plus the rest (see REST_PART). Parts that do not add up to their
    phase's total are not shown: the phase is then one part, its total."""
    breakdown = {_part_name(label): gib for label, gib in result["breakdown"].items()}
    context = breakdown.get(CONTEXT_PART, 0.0)
    rows: list[tuple[str, str, float]] = []
    for phase in PHASES:
        memory = result["phases"][phase]
        total = memory["vram_gib"]
        if total <= 0:
            rows.append((phase, "not run", 0.0))  # keeps the phase on the axis
            continue
        if memory.get("parts"):
            parts = [(_part_name(label), gib) for label, gib in memory["parts"].items() if gib > 0]
        elif phase == "training step" and abs(sum(breakdown.values()) - total) <= ROUNDING_GIB:
            parts = [(name, gib) for name, gib in breakdown.items() if gib > 0]
        else:
            parts = [(CONTEXT_PART, context)] if 0 < context <= total else []
        known = sum(gib for _, gib in parts)
        if known > total + ROUNDING_GIB:
            parts, known = [("total", total)], total
        rows += [(phase, name, gib) for name, gib in parts]
        if total - known > ROUNDING_GIB:
            rows.append((phase, REST_PART, round(total - known, 3)))
    return rows


def _strategy_row(name: str, plan: LowVramPlan, result: Estimate, on_cpu: bool = False) -> list[Any]:
    what = describe_plan(replace(plan, reason=""), on_cpu).removeprefix(f"strategy {plan.strategy}")
    vram = "—" if on_cpu else round(result.vram_gib, 2)
    return [name, vram, round(result.ram_gib, 2), result.verdict or "—", what.removeprefix(", ")]


def job_row_name(spec: JobSpec, plan: LowVramPlan) -> str:
    """'this job: auto → none', 'this job: extreme', 'this job: conservative + its own settings'."""
    strategy = spec.lowvram.strategy
    name = f"this job: {strategy}" + (f" → {plan.strategy}" if strategy == "auto" else "")
    own = spec.lowvram.model_dump(exclude_defaults=True, exclude={"strategy", "vram_gib"})
    return name + (" + its own settings" if own else "")


def strategy_rows(spec: JobSpec, gpu_gib: float | None, job: tuple[LowVramPlan, Estimate] | None = None,
                  on_cpu: bool = False) -> list[list[Any]]:
    """First the job as it is set (its strategy with its own [lowvram] settings; auto as it resolves), then each
    bundle as the bundle is (the job's own savers left out, so the bundles differ from each other and from the
    job): `job`, the job's own (plan, estimate) when the caller has them."""
    plan, result = job or (resolve_lowvram(spec, gpu_gib), None)
    rows = [_strategy_row(job_row_name(spec, plan), plan, result or estimate_job(spec, gpu_gib, plan=plan), on_cpu)]
    for strategy in CONCRETE:
        bundle = type(spec.lowvram)(strategy=strategy, vram_gib=spec.lowvram.vram_gib)
        copy = spec.model_copy(update={"lowvram": bundle})
        plan = resolve_lowvram(copy, gpu_gib)
        # Estimated without a GPU size, so without the search for a suggestion (the table shows none): a few ms
        # for the four. The verdict is the estimator's own rule.
        bare = copy.model_copy(update={"lowvram": copy.lowvram.model_copy(update={"vram_gib": None})})
        result = estimate_job(bare, None, plan=plan)
        if gpu_gib is not None:
            result.verdict = verdict(result.vram_gib, gpu_gib)
        rows.append(_strategy_row(strategy, plan, result, on_cpu))
    return rows


def _details(result: Estimate, plan: LowVramPlan, on_cpu: bool = False) -> str:
    lines = _plan_lines(plan, result, on_cpu)
    if on_cpu:  # no GPU: system RAM is all there is
        table = ["| phase | RAM (GiB) |", "| --- | ---: |"]
        table += [f"| {name} | {memory.ram_gib:.2f} |" for name, memory in result.phases.items()]
    else:
        table = ["| phase | VRAM (GiB) | RAM (GiB) |", "| --- | ---: | ---: |"]
        table += [f"| {name} | {memory.vram_gib:.2f} | {memory.ram_gib:.2f} |"
                  for name, memory in result.phases.items()]
    lines.append("\n".join(table))
    lines += [f"- {cpu_words(note) if on_cpu else note}" for note in result.notes]
    return "\n\n".join(lines)


def gpu_problems(gpu_gib: Any) -> list[str]:  # noqa: ANN401
    """The estimator's GPU memory (GiB), in page words: empty, or a size from 0 to 1024 (also checked as typed)."""
    try:
        given = float(gpu_gib) if gpu_gib not in (None, "") else None
    except (TypeError, ValueError):
        given = -1.0
    if given is None or 0 <= given <= 1024:
        return []
    return [f"GPU memory (GiB): {gpu_gib!r} is not a size between 0 and 1024 (0: the planned or detected GPU)"]


def estimate_form(values: dict[str, Any], base: dict[str, Any] | None, gpu_gib: Any,  # noqa: ANN401
                  detected: float | None, labels: Mapping[str, str] | None = None) -> EstimatorReport:
    """The estimator tab's report for the form's job against `gpu_gib` (0 or empty: the job's GPU memory to plan
    for, else the detected GPU). A form the estimator cannot read gives one problems line naming the fields."""
    problems = gpu_problems(gpu_gib)
    given = float(gpu_gib) if gpu_gib not in (None, "") and not problems else None
    try:
        spec = form.form_to_spec(values, base)
    except SpecError as exc:
        problems += exc.problems
    if problems:
        return EstimatorReport(problems_line(problems, labels), problems=problems)
    target, source = gpu_target(spec, detected, given)
    on_cpu = source == NO_GPU
    plan = resolve_lowvram(spec, target, ram_gib=_available_ram())
    result = estimate_job(spec, target, plan=plan)
    data = result.to_json()
    # On a CPU-only machine there is no GPU memory to show: no VRAM bars or breakdown (no CUDA context either).
    breakdown = [] if on_cpu else [[label, round(gib, 3)] for label, gib in result.breakdown.items()]
    return EstimatorReport(
        line=verdict_line(result, target, source, ram_line(spec, plan, target)),
        details=_details(result, plan, on_cpu),
        phase_rows=[] if on_cpu else phase_rows(data),
        strategy_rows=strategy_rows(spec, target, (plan, result), on_cpu),
        breakdown_rows=breakdown,
        result=data,
    )


# ---------------------------------------------------------------------- the estimator's "To fit", applied

SUGGESTED = re.compile(r"^([a-z_]+)\.([a-z_]+) (=|≥) (.+)$")  # one change of a suggestion: `key = value`, `key ≥ n`


def suggestion_changes(suggestion: str | None) -> dict[str, dict[str, Any]]:
    """The settings of an estimator suggestion ('lowvram.blocks_to_swap ≥ 18; model.base_precision = "fp8"') as a
    nested job dict; {} when it names none (e.g. 'none of the supported changes is enough')."""
    import tomllib

    changes: dict[str, dict[str, Any]] = {}
    for part in (suggestion or "").split("; "):
        found = SUGGESTED.match(part.strip())
        if not found:
            continue
        section, key, _, text = found.groups()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            continue
        changes.setdefault(section, {})[key] = value
    return changes


def apply_suggestion(values: dict[str, Any], base: dict[str, Any] | None, gpu_gib: Any,  # noqa: ANN401
                     detected: float | None) -> tuple[dict[str, Any] | None, str]:
    """(the form with the estimator's "To fit" changes made, what was changed) — or (None, why not)."""
    report = estimate_form(values, base, gpu_gib, detected)
    if not report.ok:
        return None, report.line
    changes = suggestion_changes((report.result or {}).get("suggestion"))
    if not changes:
        return None, "nothing to apply: the job fits" if report.line.startswith(("fits", "tight")) else \
            f"nothing to apply: {(report.result or {}).get('suggestion') or report.line}"
    job = form.values_to_dict(values, base)
    for section, table in changes.items():
        job.setdefault(section, {}).update(table)
    try:
        spec = form.parse_form_dict(job)
    except SpecError as exc:
        return None, "not applied: " + "; ".join(exc.problems)
    shown = "; ".join(f"{section}.{key} = {value}" for section, table in changes.items()
                      for key, value in table.items())
    return form.spec_to_values(spec), f"applied: {shown}"
