"""Flux LoRA Studio: start the Gradio app.

    python app.py [--port 7860] [--listen] [--share] [--auth user:password] [--workdir DIR]

Gradio and the UI are imported only after the arguments are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
from pathlib import Path

SHARE_USER = "studio"


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected user:password, e.g. --auth me:secret")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Flux LoRA Studio: train LoRA adapters for FLUX image models.")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on; 0 picks a free one (default 7860)")
    parser.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0), not only localhost")
    parser.add_argument("--share", action="store_true",
                        help="make a public Gradio share link; it always asks for a password")
    parser.add_argument("--auth", type=parse_auth, metavar="USER:PASSWORD", help="ask for this login")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for the demo (.studio/demo) and outputs (output/); default: the app's folder")
    return parser


def decide_auth(share: bool, auth: tuple[str, str] | None) -> tuple[tuple[str, str] | None, str | None]:
    """(login to require, message to print). A share link never goes out without a password: one is made up."""
    if auth is not None or not share:
        return auth, None
    password = secrets.token_urlsafe(12)
    return (SHARE_USER, password), f"share link login -> user: {SHARE_USER}  password: {password}"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    port = args.port or free_port(host)
    auth, message = decide_auth(args.share, args.auth)
    if message:
        print(message, flush=True)
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    import ui
    from trainer.runner import TrainingRunner

    app = ui.build_app(TrainingRunner(), workdir)
    print(f"Flux LoRA Studio: http://{'localhost' if host == '127.0.0.1' else host}:{port}  (workdir {workdir})",
          flush=True)
    app.queue().launch(server_name=host, server_port=port, share=args.share, auth=auth,
                       allowed_paths=ui.allowed_paths(workdir))


if __name__ == "__main__":
    sys.exit(main())
