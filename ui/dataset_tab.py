"""Dataset & Captioning tab: one image folder, how its captions are made, its masks, the images held out for the
evaluation loss, and a check that lists it."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.form import api_name, field_choices, keyword_handler
from ui.studio import Studio

DATASET_KEYS = ("dataset.path", "dataset.trigger", "dataset.caption_strategy", "dataset.instance_prompt",
                "dataset.repeats", "data.resolution", "data.caption_dropout")


def build(fields: dict[str, gr.components.Component], defaults: dict[str, Any], studio: Studio) -> None:
    fields["dataset.path"] = gr.Textbox(
        value=defaults["dataset.path"], label="Image folder",
        info="a folder of images; captions in .txt files beside them (same name)")
    with gr.Row():
        fields["dataset.trigger"] = gr.Textbox(
            value=defaults["dataset.trigger"], label="Trigger word",
            info="put in front of every caption that lacks it")
        fields["dataset.caption_strategy"] = gr.Dropdown(
            choices=field_choices("dataset.caption_strategy"), value=defaults["dataset.caption_strategy"],
            label="Caption strategy", info="textfile: the .txt beside each image; filename: the file name; "
                                           "instance_prompt: the same caption for every image")
    fields["dataset.instance_prompt"] = gr.Textbox(
        value=defaults["dataset.instance_prompt"], label="Instance prompt",
        info="the caption of every image when the strategy is instance_prompt")
    with gr.Row():
        fields["dataset.repeats"] = gr.Number(
            value=defaults["dataset.repeats"], precision=0, label="Repeats",
            info="times each image is seen per epoch")
        fields["data.resolution"] = gr.Number(
            value=defaults["data.resolution"], precision=0, step=64, label="Resolution (px)",
            info="images are scaled and cropped to this size")
        fields["data.caption_dropout"] = gr.Slider(
            0.0, 1.0, value=defaults["data.caption_dropout"], step=0.01, label="Caption dropout",
            info="share of steps trained with an empty caption")
    fields["dataset.masks"] = gr.Textbox(
        value=defaults["dataset.masks"], label="Mask folder",
        info="optional: mask images with the same names as the training images; white is trained, black is "
             "ignored by the loss")
    with gr.Row():
        fields["data.eval_holdout"] = gr.Number(
            value=defaults["data.eval_holdout"], precision=0, label="Evaluation hold-out",
            info="images held out of the first dataset (from its end) for the evaluation loss; 0: none")
        fields["data.prior_loss_weight"] = gr.Number(
            value=defaults["data.prior_loss_weight"], label="Prior loss weight",
            info="loss weight of regularisation (prior-preservation) datasets, those marked is_regularisation "
                 "in a loaded job")
    check = gr.Button("Check dataset")
    report = gr.Markdown()

    def check_dataset(values: dict[str, Any]) -> str:
        """How many images the dataset folder has, and the first captions as training will see them."""
        return studio.check_dataset(values)

    check.click(keyword_handler(check_dataset), inputs_kwargs={api_name(key): fields[key] for key in DATASET_KEYS},
                outputs=report, api_name="check_dataset")
