"""The RAM verdict: first-run and repeated-run RAM against the available RAM, fits / tight / will not fit, and the
cheapest setting that fits when it does not; the CLI refuses a run that will not fit unless --force."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.memory import system_ram
from trainer.memory.strategies import bundle_plan
from trainer.memory.system_ram import RamVerdict, ram_verdict, ram_verdict_word
from trainer.spec import parse_spec


def _spec(flavour: str = "klein-base-9b", **model: object) -> object:
    return parse_spec({"model": {"family": "flux2", "flavour": flavour, "source": "x", "base_precision": "fp8",
                                 **model},
                       "lowvram": {"strategy": "aggressive"}, "data": {"cache_text_embeddings": "disk"}})


def test_the_words_follow_the_vram_verdict() -> None:
    assert ram_verdict_word(10.0, 20.0) == "fits"
    assert ram_verdict_word(19.0, 20.0) == "tight"
    assert ram_verdict_word(21.0, 20.0) == "will not fit"


def test_a_first_run_is_judged_on_its_own_figure_and_a_repeated_run_on_its_own() -> None:
    spec = _spec()
    plan = bundle_plan(spec, "aggressive")
    cold = ram_verdict(spec, plan, 8.0, available_gib=12.0)
    assert cold.first_run_gib > cold.repeated_gib  # the text encoder loads only on the first run
    assert cold.repeated_gib < 12.0 < cold.first_run_gib and cold.verdict == "will not fit"
    warm = ram_verdict(spec, plan, 8.0, available_gib=12.0, warm=True)
    assert warm.verdict in ("fits", "tight") and not warm.remedy
    assert warm.line().startswith(f"RAM {warm.verdict} — first run {cold.first_run_gib:.1f} GiB, repeated runs")


def test_the_cheapest_setting_that_fits_is_named_with_its_figure() -> None:
    spec = _spec()  # klein 9B (fp8) with a bf16 Qwen3-8B: the first run needs 13.4 GiB
    verdict = ram_verdict(spec, bundle_plan(spec, "aggressive"), 8.0, available_gib=12.0)
    assert verdict.remedy.startswith('model.text_encoder_precision = "int8" (')
    assert "cheapest setting that fits: model.text_encoder_precision" in verdict.line()
    # FLUX.2 dev on 32 GiB: a quantised encoder alone is not enough, blocks on disk as well is
    dev = _spec("dev")
    verdict = ram_verdict(dev, bundle_plan(dev, "aggressive"), 24.0, available_gib=32.0)
    assert verdict.verdict == "will not fit"
    assert verdict.remedy.startswith('model.text_encoder_precision = "int8" and lowvram.swap_from = "disk"')


def test_nothing_that_fits_says_so() -> None:
    line = RamVerdict(200.0, 150.0, 8.0, warm=False).line()
    assert line.startswith("RAM will not fit") and "no single setting makes it fit" in line


def test_the_cli_refuses_a_run_that_will_not_fit_unless_forced(demo_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from trainer.__main__ import main

    monkeypatch.setattr(system_ram, "available_ram_gib", lambda: 0.5)  # less than the process alone
    settings = ["--set", "train.max_steps=1", "--set", "sample.prompts=[]", "--set", f"output.dir='{tmp_path}'",
                "--no-progress"]
    assert main(["train", str(demo_dir / "job.toml"), *settings]) == 2
    err = capsys.readouterr().err
    assert "error: RAM will not fit — first run" in err and "--force" in err and "Traceback" not in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before the output folder is touched
    assert main(["train", str(demo_dir / "job.toml"), *settings, "--force"]) == 0
    assert list(tmp_path.glob("*.safetensors"))
