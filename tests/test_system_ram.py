"""The system-RAM check before loading: silent when it fits, a warning naming what to change when not."""

from __future__ import annotations

from trainer.memory.strategies import bundle_plan
from trainer.memory.system_ram import ram_warning, shortfall_message
from trainer.spec import parse_spec


def _spec(**lowvram: object) -> object:
    return parse_spec({"model": {"family": "flux2", "flavour": "klein-base-9b", "source": "x"},
                       "lowvram": {"strategy": "aggressive", **lowvram}})


def test_fits_in_free_ram_says_nothing() -> None:
    spec = _spec()
    assert shortfall_message(20.0, 32.0, 0.0, spec, bundle_plan(spec, "aggressive")) is None


def test_spilling_into_swap_warns_of_slowness() -> None:
    spec = _spec()
    message = shortfall_message(40.0, 32.0, 16.0, spec, bundle_plan(spec, "aggressive"))
    assert "spill into swap" in message and "40.0 GiB" in message


def test_not_enough_names_each_remedy() -> None:
    spec = _spec()
    plan = bundle_plan(spec, "aggressive")
    message = shortfall_message(70.0, 32.0, 8.0, spec, plan)
    assert "killed" in message and "70.0 GiB" in message
    assert 'model.base_precision = "fp8"' in message
    assert 'data.cache_text_embeddings = "disk"' in message
    assert f"fewer lowvram.blocks_to_swap than {plan.blocks_to_swap}" in message
    assert "pagefile" in message


def test_a_real_estimate_against_this_machine() -> None:
    spec = parse_spec({"model": {"family": "flux2", "flavour": "dev", "source": "x"}})
    plan = bundle_plan(spec, "extreme")
    message = ram_warning(spec, plan, 8.0)  # FLUX.2 dev holds far more than this machine's RAM
    assert message is not None and "system RAM" in message
