"""The dataset check reports the same picture saved again (a JPEG of a PNG, a smaller copy) as a likely duplicate,
naming both files; distinct pictures, even of one shape in other colours, are not."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from trainer.__main__ import main
from trainer.data.health import check_datasets
from trainer.spec import DatasetEntry


def test_a_reencoded_copy_is_a_likely_duplicate_and_the_cli_names_both(demo_dir: Path, tmp_path: Path,
                                                                       capsys) -> None:
    folder = Path(shutil.copytree(demo_dir / "dataset", tmp_path / "dataset"))
    originals = sorted(folder.glob("*.png"))
    first, second = originals[0], originals[1]
    with Image.open(first) as image:
        image.convert("RGB").save(folder / "copy_as.jpg", quality=85)
    with Image.open(second) as image:
        image.resize((56, 56), Image.Resampling.LANCZOS).save(folder / "smaller.png")
    report = check_datasets([DatasetEntry(path=str(folder))])
    likely = {row.file.name: row.problem for row in report.rows if "looks like" in row.problem}
    # the row is the later file in the listing's order, naming the earlier one
    assert likely.keys() == {first.name, "smaller.png"}, likely
    assert likely[first.name].startswith("looks like dataset/copy_as.jpg (the same picture saved again, e.g. as JPEG)")
    assert likely["smaller.png"].startswith(f"looks like dataset/{second.name} (the same picture saved again")
    # the demo's own pictures (shapes in a few colours on plain grounds) are all told apart
    for name in ("dataset", "dataset_edit", "dataset_edit_ref"):  # the edit pairs: one shape, colours swapped
        plain = check_datasets([DatasetEntry(path=str(demo_dir / name))])
        assert not [row for row in plain.rows if row.kind == "duplicate"], name
    assert main(["validate", str(demo_dir / "job.toml"), "--set", f"data.datasets=[{{path='{folder}'}}]"]) == 0
    out = capsys.readouterr().out
    assert first.name in out and "looks like dataset/copy_as.jpg" in out
