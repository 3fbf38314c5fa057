"""What a first run needs in RAM (text embeddings computed) for the smallest tiers' presets, and the estimator's model
of it: one model at a time while loading, quantised text encoders, FLUX.1's modulation quantised, blocks on disk."""

from __future__ import annotations

import json
import re

import pytest

from trainer import registry
from trainer.__main__ import main
from trainer.estimator.activations import text_encoder_weights
from trainer.estimator.core import GIB
from trainer.estimator.job import estimate_job
from trainer.estimator.shapes import TEXT_ENCODERS, weight_layout
from trainer.profiles import apply_layers, get_preset, get_profile, list_presets
from trainer.spec import JobSpec, deep_merge, parse_spec

EDITS = {"model": {"source": "/models/flux"}, "data": {"datasets": [{"path": "/data/images"}]},
         "sample": {"prompts": ["a photo of sks"]}}
# the targets: the first run with the preset of the flavour's smallest tier, GiB
TARGETS = {"flux2-klein-base-9b-8gb": 16.0, "flux2-klein-base-4b-8gb": 12.0, "flux1-dev-12gb": 16.0,
           "flux2-dev-24gb": 32.0}


def _preset_job(name: str, **edits: dict) -> JobSpec:
    preset = get_preset(name)
    return parse_spec(apply_layers({}, get_profile(preset.profile), preset, deep_merge(EDITS, edits)), name)


@pytest.mark.parametrize(("name", "most"), TARGETS.items())
def test_the_smallest_tiers_first_run_fits_the_ram_people_have(name: str, most: float) -> None:
    result = estimate_job(_preset_job(name))
    assert result.verdict in ("fits", "tight")
    assert result.first_run_ram_gib <= most
    assert result.first_run_ram_gib >= result.ram_gib  # a repeated run never needs more


def test_every_preset_header_states_its_first_run_ram() -> None:
    for preset in list_presets():
        if preset.flavour == "demo":
            continue  # the offline demo runs anywhere; its header says so instead
        header = preset.path.read_text(encoding="utf-8").split("[preset]")[0].replace("\n# ", " ")
        found = re.search(r"([\d.]+) GiB RAM once captions are cached, ([\d.]+) GiB RAM on the first run", header)
        assert found, preset.name
        result = estimate_job(_preset_job(preset.name))
        assert float(found.group(2)) == pytest.approx(result.first_run_ram_gib, abs=0.05), preset.name
        assert float(found.group(1)) == pytest.approx(result.ram_gib, abs=0.05), preset.name


def test_loading_holds_one_model_at_a_time() -> None:
    spec = _preset_job("flux2-klein-base-9b-8gb", model={"text_encoder_precision": "bf16"},
                       data={"cache_text_embeddings": "memory"})
    result = estimate_job(spec)
    transformer, encoder = result.components["transformer (fp8)"], result.components[
        "text encoder (Qwen3-8B, bf16)"]
    loading = result.phases["loading"].ram_gib
    assert max(transformer, encoder) + 2 < loading < transformer + encoder  # the larger of the two, not the sum
    assert result.phases["caching text embeddings"].ram_gib < encoder + 3  # the transformer is not loaded yet


def test_quantised_text_encoders_keep_the_token_table_in_bf16() -> None:
    shape = TEXT_ENCODERS["Qwen3-8B"]
    layer16, outside16 = text_encoder_weights(shape, "bf16")
    layer8, outside8 = text_encoder_weights(shape, "fp8")
    layer4, _ = text_encoder_weights(shape, "nf4")
    assert layer8 == pytest.approx(layer16 / 2) and layer4 == pytest.approx(layer16 * 0.5625 / 2)
    table = shape.vocab * shape.hidden * 2
    assert outside8 == pytest.approx(table)  # the table alone (no head is loaded), in bf16 in every precision
    whole = {p: estimate_job(_preset_job("flux2-klein-base-9b-8gb", model={"text_encoder_precision": p}))
             .components[f"text encoder (Qwen3-8B, {p})"] for p in ("bf16", "fp8", "nf4")}
    assert whole["bf16"] == pytest.approx(11.2, abs=0.2)  # 6.03 B parameters: the 28 layers read, no head
    assert whole["fp8"] == pytest.approx(6.2, abs=0.2) and whole["nf4"] == pytest.approx(4.0, abs=0.2)


def test_flux1_modulation_quantised_brings_a_4bit_step_under_10_5_gib() -> None:
    flux1 = registry.get_flavour("flux1", "dev")
    kept, int8 = weight_layout(flux1, "nf4"), weight_layout(flux1, "nf4", "int8")
    assert (kept.total - int8.total) / GIB == pytest.approx(3.0, abs=0.1)  # 3.2 B modulation weights, 2 -> 1 B
    step = {}
    for modulation in ("auto", "nf4", "bf16"):
        spec = _preset_job("flux1-dev-12gb", model={"base_precision": "nf4", "modulation_precision": modulation},
                           lowvram={"blocks_to_swap": 0}, lora={"rank": 16})
        result = estimate_job(spec, 24.0)
        assert result.plan.count("checkpointing every block") and "swapped" not in result.plan
        step[modulation] = result.phases["training step"].vram_gib
    assert step["auto"] <= 10.5 and step["nf4"] < step["auto"] < step["bf16"] - 2.5


def test_blocks_on_disk_leave_a_staging_ring_in_ram_and_say_what_the_reads_cost() -> None:
    ram = estimate_job(_preset_job("flux2-dev-24gb", lowvram={"swap_from": "ram"}))
    disk = estimate_job(_preset_job("flux2-dev-24gb", lowvram={"swap_from": "disk", "disk_read_gbps": 6.0}))
    swapped = next(v for k, v in ram.ram_breakdown.items() if k.startswith("swapped base weights"))
    ring = next(v for k, v in disk.ram_breakdown.items() if k.startswith("block staging ring (2 x"))
    assert disk.block_cache_gib == pytest.approx(swapped) and ring < swapped / 8  # 2 of 30 blocks
    assert disk.phases["training step"].ram_gib == pytest.approx(ram.phases["training step"].ram_gib - swapped + ring)
    assert disk.phases["loading"].ram_gib < ram.phases["loading"].ram_gib - swapped + 2 * ring
    note = next(n for n in disk.notes if n.startswith("blocks on disk"))
    seconds = 2 * swapped * GIB / 6e9
    assert f"save {swapped - ring:.1f} GiB" in note and f"takes {seconds:.1f} s" in note and "6 GB/s" in note


def test_the_cli_estimates_a_preset_with_its_first_run(capsys: pytest.CaptureFixture) -> None:
    assert main(["estimate", "--preset", "flux2-klein-base-9b-8gb", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["first_run_ram_gib"] <= 16 and result["ram_verdict"].startswith("RAM ")
    assert main(["estimate", "--preset", "no-such-preset"]) == 2
    assert "--preset: " in capsys.readouterr().err


def test_auto_puts_the_swapped_blocks_on_disk_only_when_ram_needs_it() -> None:
    from trainer.estimator.auto import resolve_lowvram

    preset = get_preset("flux2-dev-24gb")
    layers = apply_layers({}, get_profile(preset.profile), preset, EDITS)
    del layers["lowvram"]["swap_from"]  # unset: the machine's RAM decides
    spec = parse_spec(layers)
    assert resolve_lowvram(spec, 23.5).swap_from == "ram"  # no RAM figure: as the job says
    assert resolve_lowvram(spec, 23.5, ram_gib=64.0).swap_from == "ram"  # the blocks fit in RAM
    tight = resolve_lowvram(spec, 23.5, ram_gib=30.0)
    assert tight.swap_from == "disk" and "blocks on disk" in tight.reason
    assert resolve_lowvram(spec, 23.5, ram_gib=8.0).swap_from == "ram"  # disk would not fit either: unchanged
    explicit = _preset_job("flux2-dev-24gb", lowvram={"swap_from": "ram"})
    assert resolve_lowvram(explicit, 23.5, ram_gib=30.0).swap_from == "ram"  # the job's own choice stands


def test_auto_quantises_the_text_encoder_first_then_puts_blocks_on_disk_and_a_stated_precision_stands() -> None:
    from trainer.estimator.auto import resolve_lowvram
    from trainer.memory.system_ram import ram_verdict

    preset = get_preset("flux2-dev-24gb")  # FLUX.2 dev: Mistral-Small-3.1's 31 layers read, 30 blocks swapped
    layers = apply_layers({}, get_profile(preset.profile), preset, EDITS)
    del layers["model"]["text_encoder_precision"], layers["lowvram"]["swap_from"]  # both left to auto
    spec = parse_spec(layers)
    assert spec.model.text_encoder_precision == "auto"
    as_is = resolve_lowvram(spec, 23.5)  # no RAM figure: bf16, blocks in RAM
    assert (as_is.text_encoder_precision, as_is.swap_from) == ("bf16", "ram")
    # fake available RAM figures around the estimate's first runs: bf16 35.5, int8 33.4, int8 + disk 19.4 GiB
    chosen = {ram: resolve_lowvram(spec, 23.5, ram_gib=ram) for ram in (64.0, 34.5, 25.0, 15.0)}
    assert [(p.text_encoder_precision, p.swap_from) for p in chosen.values()] == [
        ("bf16", "ram"), ("int8", "ram"), ("int8", "disk"), ("bf16", "ram")]  # 15: nothing fits, as it is
    assert "text encoder int8: 33.4 GiB of RAM on the first run fits the 34.5 GiB available" in chosen[34.5].reason
    assert "blocks on disk and text encoder int8" in chosen[25.0].reason
    verdict = ram_verdict(spec, chosen[34.5], 23.5, available_gib=40.0)  # the estimate follows the plan's choice
    assert verdict.verdict == "fits" and verdict.first_run_gib == pytest.approx(33.35, abs=0.05)
    before = ram_verdict(spec, as_is, 23.5, available_gib=34.5)  # the RAM verdict's cheapest change names it
    assert before.remedy.startswith('model.text_encoder_precision = "int8" (33.4 GiB)')
    stated = parse_spec(deep_merge(layers, {"model": {"text_encoder_precision": "bf16"}}))
    kept = resolve_lowvram(stated, 23.5, ram_gib=30.0)  # a preset or job that states bf16 keeps it
    assert kept.text_encoder_precision == "bf16"
    preset_as_is = _preset_job("flux2-klein-base-9b-8gb")  # states int8
    assert resolve_lowvram(preset_as_is, 7.6, ram_gib=64.0).text_encoder_precision == "int8"


def test_a_session_loads_and_keys_its_text_embeddings_with_the_precision_auto_chose(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.memory import system_ram
    from trainer.session import Session

    spec = parse_spec({"model": {"family": "flux2", "flavour": "klein-base-9b", "source": str(tmp_path / "model"),
                                 "base_precision": "fp8"},  # text_encoder_precision left to auto
                       "data": {"datasets": [{"path": str(tmp_path / "images")}]},
                       "output": {"dir": str(tmp_path / "out")}})
    for available, chosen in ((64.0, "bf16"), (12.0, "int8")):  # a fake machine: the first run in bf16 needs 13.4 GiB
        monkeypatch.setattr(system_ram, "available_ram_gib", lambda available=available: available)
        session = Session(spec)  # nothing loads yet: the plan and the concrete job
        assert session.plan.text_encoder_precision == chosen
        assert session.spec.model.text_encoder_precision == chosen  # what the loaders and cache keys read
        assert session.spec_as_run().model.text_encoder_precision == chosen  # job.resolved.toml
