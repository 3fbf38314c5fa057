"""The low-VRAM strategies: bundle contents, explicit keys on top, the rules between keys, and auto's choice."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trainer import registry
from trainer.estimator.auto import choose_auto, resolve_lowvram
from trainer.estimator.job import estimate_job
from trainer.memory.strategies import BUNDLES, CONCRETE, bundle_plan
from trainer.spec import JobSpec, SpecError, parse_spec

KLEIN_9B_MOST = registry.get_flavour("flux2", "klein-base-9b").max_blocks_to_swap  # 30


def _spec(flavour: str = "klein-base-9b", **sections: dict) -> JobSpec:
    data: dict = {"model": {"family": "flux2", "flavour": flavour}, "data": {"resolution": 1024}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_spec(data)


def test_bundles_get_heavier_in_order() -> None:
    spec = _spec()
    plans = {name: bundle_plan(spec, name) for name in CONCRETE}
    none, conservative, aggressive, extreme = (plans[name] for name in CONCRETE)
    assert (none.blocks_to_swap, none.gradient_checkpointing, none.text_encoder_device) == (0, False, "gpu")
    assert not (none.cpu_offload_checkpointing or none.optimizer_offload or none.fused_backward)
    assert conservative.gradient_checkpointing and conservative.checkpointing_interval == 1
    assert conservative.blocks_to_swap == 0 and conservative.text_encoder_device == "offload"
    # aggressive swaps half of the flavour's swappable blocks, rounded down; extreme all of them
    assert aggressive.blocks_to_swap == KLEIN_9B_MOST // 2
    assert aggressive.cpu_offload_checkpointing and aggressive.fused_backward and not aggressive.optimizer_offload
    assert extreme.blocks_to_swap == KLEIN_9B_MOST and extreme.swap_prefetch == 2
    assert extreme.optimizer_offload and extreme.text_encoder_device == "cpu"
    assert all(plan.strategy == name and plan.pin_memory for name, plan in plans.items())
    # the share is of each flavour's own maximum
    for family, flavour in (("flux2", "klein-base-4b"), ("flux2", "dev"), ("flux1", "dev")):
        spec = parse_spec({"model": {"family": family, "flavour": flavour}})
        most = registry.get_flavour(family, flavour).max_blocks_to_swap
        assert bundle_plan(spec, "aggressive").blocks_to_swap == int(BUNDLES["aggressive"]["blocks_to_swap"] * most)
        assert bundle_plan(spec, "extreme").blocks_to_swap == most


def test_explicit_keys_win_over_the_bundle() -> None:
    spec = _spec(lowvram={"strategy": "aggressive", "blocks_to_swap": 3, "fused_backward": False,
                          "text_encoder_device": "gpu", "swap_prefetch": 3, "pin_memory": False,
                          "checkpointing_interval": 2})
    plan = resolve_lowvram(spec, 8.0)
    assert (plan.strategy, plan.blocks_to_swap, plan.fused_backward, plan.text_encoder_device) == \
        ("aggressive", 3, False, "gpu")
    assert (plan.swap_prefetch, plan.pin_memory, plan.checkpointing_interval) == (3, False, 2)
    assert plan.cpu_offload_checkpointing  # what the job leaves unset still comes from the bundle
    assert plan.reason == "chosen in the job"
    # the argument beats both the bundle and the job (auto's search uses it)
    assert bundle_plan(spec, "aggressive", blocks_to_swap=7).blocks_to_swap == 7


def test_swap_forces_checkpointing_and_offload_needs_it() -> None:
    plan = resolve_lowvram(_spec(lowvram={"strategy": "none", "blocks_to_swap": 4}), None)
    assert plan.blocks_to_swap == 4 and plan.gradient_checkpointing
    # without checkpointing there are no checkpoint inputs to offload
    plan = resolve_lowvram(_spec(lowvram={"strategy": "none", "cpu_offload_checkpointing": True}), None)
    assert not plan.gradient_checkpointing and not plan.cpu_offload_checkpointing
    # turning checkpointing off explicitly under a swap is a contradiction the spec reports
    with pytest.raises(SpecError, match="blocks_to_swap: swapped blocks need gradient_checkpointing"):
        _spec(lowvram={"blocks_to_swap": 4, "gradient_checkpointing": False})
    with pytest.raises(SpecError, match=f"above {KLEIN_9B_MOST}"):
        _spec(lowvram={"blocks_to_swap": KLEIN_9B_MOST + 1})


@pytest.mark.parametrize("train", [{"mixed_precision": "fp16"}, {"optimizer": "prodigy", "learning_rate": 1.0}])
def test_fused_backward_stands_aside_under_fp16_and_prodigy(train: dict) -> None:
    for strategy in ("aggressive", "extreme"):
        assert not bundle_plan(_spec(train=train), strategy).fused_backward
    assert bundle_plan(_spec(), "aggressive").fused_backward
    with pytest.raises(SpecError, match="fused_backward"):
        _spec(train=train, lowvram={"fused_backward": True})


def test_auto_without_a_gpu_or_with_a_big_one_changes_nothing() -> None:
    spec = _spec(lowvram={"strategy": "auto"})
    plan = resolve_lowvram(spec, None)
    assert plan.strategy == "none" and plan.reason.startswith("auto: no GPU")
    big = resolve_lowvram(_spec("klein-base-4b", lowvram={"strategy": "auto"}, data={"resolution": 512}), 80.0)
    assert big.strategy == "none" and not big.blocks_to_swap and big.reason.startswith("auto: fits 80 GiB")
    assert "auto" not in {resolve_lowvram(spec, gpu).strategy for gpu in (None, 4.0, 24.0, 80.0)}


def test_auto_on_a_small_gpu_swaps_the_fewest_blocks_that_fit() -> None:
    spec = _spec(model={"base_precision": "fp8"}, lowvram={"strategy": "auto"})
    plan = resolve_lowvram(spec, 8.0)
    # the lighter bundles do not fit, the first swapping bundle does with the fewest blocks
    for lighter in ("none", "conservative"):
        assert estimate_job(spec, 8.0, plan=bundle_plan(spec, lighter), suggest=False).verdict != "fits"
    assert plan.strategy == "aggressive" and 0 < plan.blocks_to_swap < KLEIN_9B_MOST
    assert estimate_job(spec, 8.0, plan=plan, suggest=False).verdict == "fits"
    fewer = replace(plan, blocks_to_swap=plan.blocks_to_swap - 1)
    assert estimate_job(spec, 8.0, plan=fewer, suggest=False).verdict != "fits"
    assert plan.reason.startswith("auto: fits 8 GiB")
    # the GPU memory the job plans for wins over the detected GPU's
    planned = _spec(model={"base_precision": "fp8"}, lowvram={"strategy": "auto", "vram_gib": 8.0})
    assert resolve_lowvram(planned, 80.0) == plan
    # a swap count the job sets is kept: auto only picks the bundle around it
    fixed = resolve_lowvram(_spec(model={"base_precision": "fp8"},
                                  lowvram={"strategy": "auto", "blocks_to_swap": KLEIN_9B_MOST}), 8.0)
    assert fixed.blocks_to_swap == KLEIN_9B_MOST and fixed.gradient_checkpointing


def test_auto_falls_back_to_extreme_when_nothing_fits() -> None:
    plan = choose_auto(_spec("dev", lowvram={"strategy": "auto"}), 4.0)
    assert plan.strategy == "extreme" and plan.blocks_to_swap == registry.get_flavour("flux2", "dev").max_blocks_to_swap
    assert "nothing fits 4 GiB" in plan.reason


def test_describe_names_every_technique_in_use() -> None:
    text = bundle_plan(_spec(), "extreme").describe()
    for words in (f"{KLEIN_9B_MOST} blocks swapped (prefetch 2, pinned)", "checkpointing every block with CPU offload",
                  "optimiser on the CPU", "fused backward", "text encoders on cpu"):
        assert words in text, (words, text)
    plain = bundle_plan(_spec(), "none").describe()
    assert plain == "strategy none, text encoders on gpu"
