"""The demo's pictures: one flat shape of a colour on a background of another, named in a caption a person can check
at a glance ("a red circle on a blue background"). The datasets, the images the tiny models are pre-trained on and
the learning check all draw them here."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEMO_SEED = 0
DEMO_IMAGE_SIZE = 64

# Colours far apart, each with one everyday name; the shapes differ in outline at 64 px.
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
TRIGGER = "shapez"


@dataclass(frozen=True)
class Picture:
    """One shape of colour `fg` on a `bg` background; `margin` px of background on each side of its box."""

    shape: str
    fg: str
    bg: str
    margin: int = DEMO_IMAGE_SIZE // 6

    @property
    def caption(self) -> str:
        return f"a {self.fg} {self.shape} on a {self.bg} background"


def draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:  # noqa: ANN001
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def render(picture: Picture, size: int = DEMO_IMAGE_SIZE):  # noqa: ANN201 - a PIL image
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLOURS[picture.bg])
    margin = picture.margin * size // DEMO_IMAGE_SIZE
    draw_shape(ImageDraw.Draw(image), picture.shape, (margin, margin, size - 1 - margin, size - 1 - margin),
               COLOURS[picture.fg])
    return image


def random_pictures(seed: int) -> Iterator[Picture]:
    """Endless pictures of every shape and colour pair, in an order fixed by `seed` (the pre-training stream)."""
    rng = random.Random(seed)
    names = list(COLOURS)
    while True:
        fg, bg = rng.sample(names, 2)
        yield Picture(rng.choice(SHAPES), fg, bg, rng.randint(DEMO_IMAGE_SIZE // 8, DEMO_IMAGE_SIZE // 4))


def training_pictures(count: int = 12) -> list[Picture]:
    """The demo dataset: the shapes in turn, the colour pairs in an order fixed by the seed (repeats only past 30)."""
    rng = random.Random(DEMO_SEED)
    names = list(COLOURS)
    pairs = [(fg, bg) for fg in names for bg in names if fg != bg]
    rng.shuffle(pairs)
    return [Picture(SHAPES[i % len(SHAPES)], *pairs[i % len(pairs)]) for i in range(count)]


def new_combination(pictures: list[Picture]) -> Picture:
    """A shape, a shape colour and a background the dataset shows, but a colour pair it never shows together."""
    pairs = {(p.fg, p.bg) for p in pictures}
    for index, fg in enumerate(dict.fromkeys(p.fg for p in pictures)):
        for bg in dict.fromkeys(p.bg for p in pictures):
            if fg != bg and (fg, bg) not in pairs:
                return Picture(SHAPES[index % len(SHAPES)], fg, bg)
    raise ValueError("every colour pair is in the dataset")


def write_dataset(folder: Path, pictures: list[Picture], size: int = DEMO_IMAGE_SIZE) -> Path:
    """Each picture as shape_NN.png with its caption in shape_NN.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, picture in enumerate(pictures):
        stem = f"shape_{index:02d}"
        render(picture, size).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(picture.caption, encoding="utf-8")
    return folder


def mean_abs_rgb_error(image, reference) -> float:  # noqa: ANN001 - PIL images
    """Mean absolute difference per RGB channel (0-255) at `image`'s size; `reference` is resized to it."""
    import numpy as np

    reference = reference.convert("RGB")
    if reference.size != image.size:
        reference = reference.resize(image.size)
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float(np.abs(a - np.asarray(reference, dtype=np.float64)).mean())


def learning_errors(samples: list[tuple[int, str, str]], dataset: Path, trigger: str = TRIGGER,
                    ) -> dict[str, tuple[float, float]]:
    """prompt -> (error of its first sample, error of its last) from the training image it names, for each sample
    prompt that is a training caption (the trigger word in front); `samples` are (step, path, prompt)."""
    from PIL import Image

    images = {path.with_suffix(".txt").read_text(encoding="utf-8").strip(): path for path in dataset.glob("*.png")}
    errors: dict[str, tuple[float, float]] = {}
    for prompt in dict.fromkeys(prompt for _, _, prompt in samples):
        caption = prompt.removeprefix(f"{trigger} ") if trigger else prompt
        if caption not in images:
            continue
        ordered = sorted((step, path) for step, path, text in samples if text == prompt)
        with Image.open(images[caption]) as reference, Image.open(ordered[0][1]) as first, \
                Image.open(ordered[-1][1]) as last:
            errors[prompt] = (mean_abs_rgb_error(first, reference), mean_abs_rgb_error(last, reference))
    return errors


def comparison_picture(samples: list[tuple[int, str, str]], dataset: Path, trigger: str = TRIGGER, scale: int = 2):  # noqa: ANN201
    """One row per sample prompt: the training image it names (blank for a new combination), its step-0 sample and its
    last, each `scale` times its size, with the steps written above: the README's picture of a demo run."""
    from PIL import Image, ImageDraw

    images = {path.with_suffix(".txt").read_text(encoding="utf-8").strip(): path for path in dataset.glob("*.png")}
    prompts = list(dict.fromkeys(prompt for _, _, prompt in samples))
    cell, header, gap = DEMO_IMAGE_SIZE * scale, 14, 4
    last_step = max(step for step, _, _ in samples)
    sheet = Image.new("RGB", (3 * cell + 4 * gap, header + len(prompts) * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(("training image", "step 0", f"step {last_step}")):
        draw.text((gap + column * (cell + gap), 2), title, fill="black")
    for row, prompt in enumerate(prompts):
        ordered = sorted((step, path) for step, path, text in samples if text == prompt)
        training = images.get(prompt.removeprefix(f"{trigger} "))
        for column, path in enumerate((training, ordered[0][1], ordered[-1][1])):
            if path is None:
                continue
            with Image.open(path) as image:
                tile = image.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (gap + column * (cell + gap), header + gap + row * (cell + gap)))
    return sheet
