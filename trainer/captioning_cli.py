"""`python -m trainer caption DIR --model florence2|blip|qwen-vl`: write a caption sidecar for every image.

Registered by trainer/__main__.py with `add_parser(sub)`; `run(args)` returns the exit code and raises
UserError for anything the user can fix. Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import UserError

DEFAULT_MODEL = "florence2"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `caption` subcommand; its `func` default is `run`."""
    from trainer.data.captioners import CAPTIONERS, CaptionOptions

    defaults = CaptionOptions()
    parser = subparsers.add_parser(
        "caption", help="write a caption .txt beside every image of a folder with a vision-language model",
        description="Caption every image of DIR that has no caption yet, writing IMAGE.txt beside it as "
                    "PREFIX, TRIGGER, caption, SUFFIX. Models: "
                    + ", ".join(f"{kind} ({source})" for kind, source in CAPTIONERS.items()) + ".",
    )
    parser.add_argument("folder", metavar="DIR", help="folder of images")
    parser.add_argument("--model", choices=list(CAPTIONERS), default=DEFAULT_MODEL,
                        help=f"captioning model (default {DEFAULT_MODEL}: long detailed captions)")
    parser.add_argument("--source", metavar="HUB_ID_OR_FOLDER",
                        help="hub id or local folder of the model (default: the model's hub id above)")
    parser.add_argument("--trigger", default="", metavar="WORD", help="trigger word written before each caption")
    parser.add_argument("--prefix", default="", help="text written first, before the trigger")
    parser.add_argument("--suffix", default="", help="text written last, after the caption")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, metavar="TOKENS",
                        help=f"most tokens the model may generate per caption (default {defaults.max_length})")
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars, metavar="N",
                        help=f"most characters in a caption file, trimmed at a sentence or word end "
                             f"(default {defaults.max_chars}; 0 = no limit)")
    parser.add_argument("--overwrite", action="store_true", help="replace captions that already exist")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                        help=f"images per batch (default {defaults.batch_size}; lower it if memory runs out)")
    parser.add_argument("--prompt", help="instruction for qwen-vl (default: ask for a long descriptive caption)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: the GPU if there is one)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="model precision (default: bf16 on GPUs that have it, fp16 on others, fp32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from trainer.data.captioners import CaptionOptions, caption_dataset, check_kind, plan_captions

    check_kind(args.model, args.prompt)
    folder = Path(args.folder).expanduser()
    options = CaptionOptions(trigger=args.trigger, prefix=args.prefix, suffix=args.suffix,
                             max_length=args.max_length, max_chars=args.max_chars, overwrite=args.overwrite,
                             batch_size=args.batch_size)
    options.check(flags=True)
    pending, skipped = plan_captions(folder, options)
    if not pending and not skipped:
        from trainer.data.datasets import IMAGE_EXTENSIONS

        raise UserError(f"{folder}: no images to caption (none of {', '.join(IMAGE_EXTENSIONS)})")
    if not pending:
        print(f"all {len(skipped)} images in {folder} already have a caption; --overwrite replaces them")
        return 0

    from tqdm import tqdm

    from trainer.quiet import silence_library_noise

    silence_library_noise()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar would sit beside ours
    bar = None

    def status(line: str) -> None:
        print(line, flush=True)

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(total=total, unit="image", dynamic_ncols=True)
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)

    try:
        summary = caption_dataset(folder, args.model, args.source, options, device=args.device,
                                  dtype=args.dtype, prompt=args.prompt, progress=progress, status=status)
    finally:
        if bar is not None:
            bar.close()
    print(summary.describe())
    return 0
