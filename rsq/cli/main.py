"""`rsq` command line: quantize | eval | demo | ... . All user I/O, logging and progress bars live here.

Defaults are not repeated here: an option left unset keeps the config dataclass's default
(rsq/config.py), and --help shows that default.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from rsq.cli import (
    cmd_ablate,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_inspect,
    cmd_push,
    cmd_quantize,
    progress,
)
from rsq.cli.interrupt import INTERRUPT_HINT
from rsq.errors import RSQError
from rsq.job.store import STATE_FILE, partial_dir

log = logging.getLogger("rsq")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsq", description="RSQ: Rotate, Scale, then Quantize LLMs to 2-4-bit weights."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_log_options(parser, "auto")
    sub = parser.add_subparsers(dest="command", required=True)

    for module in (cmd_quantize, cmd_eval, cmd_demo, cmd_inspect, cmd_push, cmd_ablate, cmd_export, cmd_generate):
        module.add_parsers(sub)
    for command in sub.choices.values():  # also after the command: `rsq quantize ... --quiet`
        _add_log_options(command, argparse.SUPPRESS)
    return parser


def _add_log_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="no progress bars or progress lines (results, warnings and errors only)",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        default=default,
        help="progress: auto = bars on a terminal, else one line per finished layer and per evaluated source; "
        "text = those lines always; json = one JSON object per line, for schedulers (default: auto)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_transformers()

    progress.configure(progress.choose_mode(args.quiet, args.log_format))
    previous = _install_sigterm()
    INTERRUPT_HINT.clear()
    try:
        return args.func(args)
    except RSQError as exc:
        print(f"rsq: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signame = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        print(f"rsq: interrupted by {signame}; {_resume_hint()}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _install_sigterm():
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _resume_hint() -> str:
    out = INTERRUPT_HINT.get("out")
    if out is None:
        return "nothing was written"
    state = partial_dir(out) / STATE_FILE
    try:
        done = json.loads(state.read_text())["finished_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no layer was finished, nothing was kept (no {partial_dir(out)}/)"
    return f"{done} finished layers kept in {partial_dir(out)}/: rerun the same command with --resume to continue"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
