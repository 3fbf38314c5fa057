"""The job spec: TOML round trip, every error at once with the field named, overrides and merging."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from trainer.demo import demo_job_toml
from trainer.spec import (
    JobSpec,
    SpecError,
    apply_overrides,
    deep_merge,
    load_spec,
    parse_spec,
    resolve_paths,
    save_spec,
    spec_to_toml,
)


def _demo_dict() -> dict:
    return tomllib.loads(demo_job_toml("flux2"))


def test_demo_job_round_trips_exactly(tmp_path: Path) -> None:
    spec = parse_spec(_demo_dict())
    path = tmp_path / "job.toml"
    save_spec(spec, path)
    again = load_spec(path)
    assert again == spec
    assert spec_to_toml(again) == path.read_text(encoding="utf-8")


def test_every_section_round_trips_with_non_default_values(tmp_path: Path) -> None:
    data = deep_merge(_demo_dict(), {
        "lora": {"rank": 32, "alpha": 8.5, "targets": "transformer_blocks\\.0\\..*", "dropout": 0.1},
        "train": {"scheduler": "cosine", "warmup_steps": 7, "max_grad_norm": 0.5, "gradient_accumulation": 3},
        "sample": {"steps": 9, "guidance": 2.5, "resolution": 128},
        "advanced": {"timestep_sampling": "mode", "loss_weighting": "cosmap", "auto_shift": False, "shift": 3.0},
        "lowvram": {"gradient_checkpointing": True},
    })
    spec = parse_spec(data)
    save_spec(spec, tmp_path / "a.toml")
    assert load_spec(tmp_path / "a.toml") == spec
    assert load_spec(tmp_path / "a.toml").sample.guidance == 2.5


def test_all_errors_reported_at_once_with_fields_and_allowed_values() -> None:
    data = deep_merge(_demo_dict(), {
        "train": {"learning_rate": -1, "optimizer": "sgd"},
        "lora": {"rank": 0},
        "model": {"flavour": "klein"},
    })
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    problems = caught.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "train.learning_rate" in text and "greater than 0" in text
    assert "train.optimizer" in text and "'adamw'" in text
    assert "lora.rank" in text
    assert "model.flavour" in text and "klein-base-9b" in text


@pytest.mark.parametrize(("section", "typo", "expected"), [
    ("lora", "rnak", "rank"),
    ("train", "learning_rte", "learning_rate"),
    ("output", "save_every_step", "save_every_steps"),
])
def test_unknown_key_suggests_nearest(section: str, typo: str, expected: str) -> None:
    data = _demo_dict()
    data[section][typo] = 1
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert caught.value.problems == [f"{section}.{typo}: unknown key; did you mean '{expected}'?"]


def test_unknown_section_and_nested_dataset_key() -> None:
    data = _demo_dict()
    data["trian"] = {"max_steps": 3}
    data["data"]["datasets"][0]["triger"] = "x"
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert "trian: unknown key; did you mean 'train'?" in caught.value.problems
    assert "data.datasets[0].triger: unknown key; did you mean 'trigger'?" in caught.value.problems


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_steps = 'many'\n", encoding="utf-8")
    with pytest.raises(SpecError) as caught:
        load_spec(bad)
    assert caught.value.problems == [
        "model: required but missing",
        "train.max_steps: Input should be a valid integer, unable to parse string as an integer (got 'many')",
    ]
    assert str(caught.value).startswith(f"{bad}: model: required")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n", encoding="utf-8")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(broken)
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "missing.toml")


def test_overrides_are_toml_literals_and_bare_words_are_strings() -> None:
    data = apply_overrides(_demo_dict(), [
        "lora.rank=16", "train.learning_rate=5e-4", "output.name=my_lora", 'sample.prompts=["a", "b"]',
        "lowvram.gradient_checkpointing=true",
    ])
    spec = parse_spec(data)
    assert spec.lora.rank == 16
    assert spec.train.learning_rate == 5e-4
    assert spec.output.name == "my_lora"
    assert spec.sample.prompts == ["a", "b"]
    assert spec.lowvram.gradient_checkpointing is True


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(SpecError, match="expected section.key=value"):
        apply_overrides({}, ["lora.rank"])


def test_merge_order_later_layers_win() -> None:
    defaults = {"train": {"learning_rate": 1e-4, "max_steps": 100}, "sample": {"prompts": ["a"]}}
    profile = {"train": {"max_steps": 200}}
    edits = {"sample": {"prompts": ["b", "c"]}}
    merged = deep_merge(defaults, profile, edits)
    assert merged == {"train": {"learning_rate": 1e-4, "max_steps": 200}, "sample": {"prompts": ["b", "c"]}}
    assert defaults["train"]["max_steps"] == 100  # inputs are not mutated


def test_relative_paths_resolve_from_the_job_folder(tmp_path: Path) -> None:
    spec = parse_spec(_demo_dict())
    resolved = resolve_paths(spec, tmp_path)
    assert resolved.model.source == str(tmp_path / "flux2")
    assert resolved.data.datasets[0].path == str(tmp_path / "dataset")
    assert resolved.output.dir == str(tmp_path / "output")
    assert spec.model.source == "flux2"  # the original is not mutated


def test_hub_ids_are_not_treated_as_paths(tmp_path: Path) -> None:
    hub_id = "black-forest-labs/FLUX.2-klein-base-4B"
    data = deep_merge(_demo_dict(), {"model": {"flavour": "klein-base-4b", "source": hub_id}})
    resolved = resolve_paths(parse_spec(data), tmp_path)
    assert resolved.model.source == "black-forest-labs/FLUX.2-klein-base-4B"


def test_defaults_are_a_valid_spec_for_a_hub_flavour() -> None:
    spec = JobSpec.model_validate({"model": {"flavour": "klein-base-9b"}})
    assert spec.model.source == "" and spec.train.optimizer == "adamw"


def test_overrides_reach_into_dataset_entries() -> None:
    data = apply_overrides(_demo_dict(), ["data.datasets[0].trigger=ohwx", "data.datasets[0].repeats=3"])
    entry = parse_spec(data).data.datasets[0]
    assert (entry.trigger, entry.repeats) == ("ohwx", 3)
    with pytest.raises(SpecError, match="'datasets' has 1 entries; no entry 4"):
        apply_overrides(_demo_dict(), ["data.datasets[4].trigger=x"])


def test_each_rule_is_reported_by_the_spec_with_its_field() -> None:
    """Rules the adapters, the LoRA formats and the schedulers once checked again, each checked here only: a
    SpecError carries (field, message) pairs, validators' own problems placed under their section."""
    data = _demo_dict()
    data["lora"].update(type="lokr", init="pissa")
    data["train"].update(scheduler="cosine", warmup_steps=500, max_steps=100)
    data["data"]["datasets"][0].update(caption_strategy="instance_prompt", instance_prompt="")
    with pytest.raises(SpecError) as raised:
        parse_spec(data)
    errors = {problem.loc: problem.msg for problem in raised.value.errors}
    assert errors == {
        "lora.init": "'pissa' applies to LoRA only; LoKr starts from 'default'",
        "train.warmup_steps": "500 must be below max_steps (100)",
        "data.datasets[0].instance_prompt": "empty; caption_strategy 'instance_prompt' needs the caption to use",
    }
    assert raised.value.problems == [f"{loc}: {msg}" for loc, msg in errors.items()]

    data = _demo_dict()
    data["lora"].update(type="lokr")
    data["output"] = {**data.get("output", {}), "formats": ["diffusers", "kohya"]}
    with pytest.raises(SpecError) as raised:
        parse_spec(data)
    assert [problem.loc for problem in raised.value.errors] == ["output.formats", "output.formats"]


def test_a_validated_spec_is_frozen_and_changed_by_copy() -> None:
    spec = parse_spec(_demo_dict())
    with pytest.raises(ValueError, match="frozen"):
        spec.train.max_steps = 3
    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 3})})
    assert longer.train.max_steps == 3 and spec.train.max_steps != 3
