"""Flux LoRA Studio: start the Gradio app.

    python app.py [--port 7860] [--listen] [--share] [--auth user:password] [--allow DIR ...] [--workdir DIR]
                  [--no-browser]

Gradio and the UI are imported only after the arguments are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from ui.upload_limits import UploadLimits

SHARE_USER = "studio"
ALL_INTERFACES, LOCALHOST = "0.0.0.0", "127.0.0.1"
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). Training runs in a thread
# of this process; each request of the page hands the GIL back and forth dozens of times, and at 5 ms a handoff
# the page would wait hundreds of milliseconds behind a busy training step.
SWITCH_INTERVAL_S = 0.0005


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
    parser.add_argument("--allow", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder the app may read and write (datasets, outputs, jobs); repeat for several. "
                             "Always allowed: the workdir, and your home folder unless --listen or --share")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for the demo (.studio/demo) and outputs (output/); default: the app's folder")
    parser.add_argument("--upload-max-mb", type=int, default=UploadLimits.max_total_mb, metavar="MB",
                        help="the most a dataset upload through the page may hold, a zip counted as it expands "
                             f"(default {UploadLimits.max_total_mb})")
    parser.add_argument("--upload-max-files", type=int, default=UploadLimits.max_files, metavar="N",
                        help=f"the most files a dataset upload may hold (default {UploadLimits.max_files})")
    parser.add_argument("--no-browser", action="store_true",
                        help="do not open the app in a browser (it opens one when a desktop is there)")
    return parser


def decide_auth(share: bool, auth: tuple[str, str] | None) -> tuple[tuple[str, str] | None, str | None]:
    """(login to require, message to print). A share link never goes out without a password: one is made up."""
    if auth is not None or not share:
        return auth, None
    password = secrets.token_urlsafe(12)
    return (SHARE_USER, password), f"share link login -> user: {SHARE_USER}  password: {password}"


def allowed_folders(args: argparse.Namespace) -> list[Path]:
    """The folders besides the workdir that users of the page may name: the --allow ones; on a private
    (localhost-only) app also the home folder, where a person's datasets usually are. Reachable from elsewhere,
    the app uses only what its owner listed."""
    folders = [Path(folder).expanduser().resolve() for folder in args.allow]
    if not (args.listen or args.share):
        folders.append(Path.home().resolve())
    return folders


def exposure_warnings(args: argparse.Namespace) -> list[str]:
    """What the person starting the app should know before others can reach it."""
    warnings = []
    if args.listen and args.auth is None and not args.share:
        warnings.append("--listen without --auth: anyone on your network can use the app and its GPU; add "
                        "--auth user:password")
    missing = [str(folder) for folder in args.allow if not Path(folder).expanduser().is_dir()]
    if missing:
        warnings.append(f"--allow: no such folder: {', '.join(missing)}")
    return warnings


def should_open_browser(args: argparse.Namespace, platform: str = sys.platform,
                        environ: dict[str, str] | None = None) -> bool:
    """Open the page for whoever started the app (a double-click shows nothing else), unless --no-browser or a
    Linux machine without a desktop: there Python's webbrowser would start a text browser in the terminal."""
    if args.no_browser:
        return False
    environ = os.environ if environ is None else environ
    if platform.startswith("linux"):
        return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch_options(args: argparse.Namespace, workdir: Path, auth: tuple[str, str] | None,
                   open_browser: bool) -> dict[str, Any]:
    """The keyword arguments of gradio's launch(): where to listen, the login (wrong passwords throttled per
    address, ui/login_throttle.py), what gradio may serve, the page built once per visitor (ui/page_cache.py)."""
    from ui.login_throttle import login_throttle_middleware
    from ui.page import APP_CSS
    from ui.page_cache import page_cache_middleware
    from ui.served import allowed_paths, blocked_paths

    host = ALL_INTERFACES if args.listen else LOCALHOST
    middleware = [page_cache_middleware(), login_throttle_middleware()]
    return {"server_name": host, "server_port": args.port or free_port(host), "share": args.share, "auth": auth,
            "allowed_paths": allowed_paths(workdir), "blocked_paths": blocked_paths(workdir),
            "inbrowser": open_browser, "app_kwargs": {"middleware": middleware}, "css": APP_CSS,
            "max_file_size": f"{args.upload_max_mb}mb"}  # gradio refuses a bigger file before it is stored


def network_addresses() -> list[str]:
    """This machine's IPv4 addresses other programs can reach it at (every interface's, loopback left out)."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.append(address.address)
    return list(dict.fromkeys(found))


def address_lines(host: str, port: int, addresses: list[str]) -> list[str]:
    """Where the page answers: localhost, and with --listen every address of this machine (0.0.0.0 is where the
    app listens, not an address a browser can open)."""
    lines = [f"Flux LoRA Studio: http://localhost:{port}"]
    if host == ALL_INTERFACES:
        if addresses:
            lines.append("On your network: " + "  ".join(f"http://{address}:{port}" for address in addresses))
        else:
            lines.append("On your network: none (this machine has no network address besides localhost)")
    return lines


def share_line(share: bool, share_url: str | None, port: int) -> str | None:
    """What the person starting the app should know about the public link."""
    if not share:
        return None
    if share_url:
        return f"Public link: {share_url}"
    return (f"No public link: it could not be made (no internet, or Gradio's share server did not answer); the app "
            f"serves locally at http://localhost:{port}")


def keep_the_page_responsive() -> None:
    """Leave one CPU core to the web server and hand it the GIL quickly, so the page answers while training (in a
    process of its own, which inherits the thread count) and captioning (a thread of this one) run. Must run before
    torch is imported (it reads OMP_NUM_THREADS once); a value the user set wins."""
    cores = os.cpu_count() or 1
    if cores > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(cores - 1))
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    keep_the_page_responsive()
    auth, message = decide_auth(args.share, args.auth)
    if message:
        print(message, flush=True)
    for warning in exposure_warnings(args):
        print(f"warning: {warning}", flush=True)
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    from trainer.runners.process import ProcessRunner
    from ui.page import build_app, serve_run_state

    folders = allowed_folders(args)
    limits = UploadLimits(args.upload_max_mb, args.upload_max_files)
    app = build_app(ProcessRunner(), workdir, folders, limits)  # training in a process of its own: see its module
    options = launch_options(args, workdir, auth, open_browser=should_open_browser(args))
    port = options["server_port"]
    for line in address_lines(options["server_name"], port, network_addresses()):
        print(line, flush=True)
    print(f"Workdir: {workdir}", flush=True)
    print(f"Folders the page may use: {', '.join(str(folder) for folder in dict.fromkeys([workdir, *folders]))}",
          flush=True)
    # quiet: gradio's own lines name 0.0.0.0 and tell the user to edit the code ("set `share=True`")
    app.queue().launch(**options, quiet=True, prevent_thread_lock=True)
    serve_run_state(app)
    line = share_line(args.share, app.share_url, port)
    if line:
        print(line, flush=True)
    app.block_thread()


if __name__ == "__main__":
    sys.exit(main())
