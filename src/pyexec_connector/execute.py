"""`pyexec-connector exec`: run one script the way a source runs it, from a shell.

The query goes through a real connector source attached to the built-in stand-in of a Vantiq server on
loopback (pyexec_connector.testing), so the engine, limits, encoders and error replies are a deployed
source's. Exit codes: 0 when the terminal reply is a success (200, 204), 1 when it is an error (400) or
none came, 2 for bad arguments."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .testing import ScriptRunner

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Run a script as a source of type PYTHONEXECUTION would, without Vantiq: a real connector source answers
one query from a built-in stand-in server on loopback. Prints each reply frame as one JSON line
({"status": ..., "body": ...}), then each notification the code sent ({"notification": ...}).
Without --capture-output, what the code prints goes to this terminal, as it would to the connector's
output."""
EPILOG = """\
examples:
  pyexec-connector exec stats.py --preset 'samples=[1, 2, 3]'
  pyexec-connector exec --code 'total = sum(values)' --preset 'values=[1, 2]' --quiet
  pyexec-connector exec rows.py --code-handles-return --presets presets.json --mode inline

exit codes: 0 the terminal reply is a success (200, 204); 1 it is an error (400: its message and the
code's traceback are printed on stderr) or none came; 2 bad arguments."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `exec` on the console command's subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "exec", help="run a script as a source would, against the built-in stand-in (for script authors)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", metavar="FILE", help="the script to run (its path is its name)")
    parser.add_argument("--code", metavar="TEXT", help="the code to run, instead of FILE")
    parser.add_argument("--name", metavar="NAME", help="the query's name (default: FILE as given)")
    parser.add_argument("--preset", metavar="NAME=JSON", action="append", default=[],
                        help="a preset value (a global of the run) as JSON, e.g. 'count=3' or 'who=\"Vantiq\"'; "
                             "repeatable; wins over --presets")
    parser.add_argument("--presets", metavar="FILE.json", help="a JSON object of preset values (presetValues)")
    parser.add_argument("--code-handles-return", action="store_true",
                        help="the code sends its own replies (codeHandlesReturn)")
    parser.add_argument("--limit-return-to", metavar="NAMES",
                        help="return only these globals, comma-separated (limitReturnTo)")
    parser.add_argument("--capture-output", action="store_true",
                        help="return what the code prints in the reply's pythonOutput (captureOutput)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float,
                        help="seconds the run may take (the query's timeout; 0: no limit)")
    parser.add_argument("--mode", choices=("process", "inline"),
                        help="where the code runs: a worker process (the default) or the connector's own loop")
    parser.add_argument("--source-config", metavar="FILE.json",
                        help="the source's configuration, {\"pythonExecConfig\": {\"general\": {...}}}; "
                             "--mode wins over its executionMode")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print only the body of a successful terminal reply")
    return parser


class UsageError(Exception):
    """An argument the command cannot use: exit 2, with the message."""


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    # Imported here: the stand-in brings aiohttp's server, which `run` must not carry (issue 11's memory).
    from .testing import ScriptRunner, SourceConfigError, query_parameters
    out, err = out or sys.stdout, err or sys.stderr
    try:
        code, name = _code(args)
        presets = _presets(args)
        source_config = _json_file(args.source_config, "--source-config") if args.source_config else None
        if source_config is not None and not isinstance(source_config, dict):
            raise UsageError("--source-config: the file must hold a JSON object")
        params = query_parameters(code, name=name, presets=presets, code_handles_return=args.code_handles_return,
                                  limit_return_to=args.limit_return_to, capture_output=args.capture_output,
                                  timeout=args.timeout)
        runner = ScriptRunner(source_config=source_config, mode=args.mode)
    except (UsageError, SourceConfigError) as exc:
        prefix = "--source-config: " if isinstance(exc, SourceConfigError) else ""
        print(f"pyexec-connector exec: error: {prefix}{exc}", file=err)
        return EXIT_USAGE
    # The connector's own warnings go to stderr: stdout carries the replies only.
    logging.basicConfig(stream=err, level=logging.WARNING, format="pyexec-connector: %(levelname)s %(message)s")
    try:
        import asyncio  # here, not at the top: cli imports this module for its parser, and healthcheck stays light

        return asyncio.run(_run(runner, params, args.quiet, out, err))
    except KeyboardInterrupt:
        print("pyexec-connector exec: interrupted", file=err)
        return EXIT_INTERRUPTED


async def _run(runner: ScriptRunner, params: dict[str, Any], quiet: bool, out: TextIO, err: TextIO) -> int:
    from .testing import SOURCE, ScriptReply
    try:
        await runner.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"pyexec-connector exec: error: the connector could not start its source: {exc!r}", file=err)
        return EXIT_ERROR_REPLY
    last: dict[str, Any] | None = None
    try:
        async for frame in runner.stream(params):
            last = frame
            if not quiet:
                print(json.dumps(frame, ensure_ascii=False), file=out, flush=True)
    except TimeoutError:
        print("pyexec-connector exec: error: no terminal reply in time", file=err)
    finally:
        await runner.stop()       # the code's remaining tasks finish; their notifications arrive
    if not quiet:
        for note in runner.server.notifications.get(SOURCE, []):
            print(json.dumps({"notification": note}, ensure_ascii=False), file=out)
    if last is None or last["status"] == 100:
        return EXIT_ERROR_REPLY
    if last["status"] < 300:
        if quiet:
            print(json.dumps(last["body"], ensure_ascii=False), file=out)
        return EXIT_OK
    reply = ScriptReply([last])
    print(f"error: {reply.error_code}: {reply.error_message}", file=err)
    if reply.traceback:
        print(reply.traceback.rstrip("\n"), file=err)
    return EXIT_ERROR_REPLY


def _code(args: argparse.Namespace) -> tuple[str, str | None]:
    if (args.file is None) == (args.code is None):
        raise UsageError("give either FILE or --code TEXT (one of them)")
    if args.code is not None:
        return args.code, args.name
    path = Path(args.file)
    try:
        return path.read_text(encoding="utf-8"), args.name or args.file
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"FILE {args.file}: cannot read it ({exc})") from exc


def _presets(args: argparse.Namespace) -> dict[str, Any]:
    presets: dict[str, Any] = {}
    if args.presets:
        loaded = _json_file(args.presets, "--presets")
        if not isinstance(loaded, dict):
            raise UsageError(f"--presets {args.presets}: the file must hold a JSON object of preset values")
        presets.update(loaded)
    for item in args.preset:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--preset {item!r}: expected NAME=JSON, e.g. count=3")
        try:
            presets[name.strip()] = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--preset {name.strip()}: {text!r} is not JSON ({exc}); a string needs quotes: "
                             f"{name.strip()}='\"{text}\"'") from exc
    return presets


def _json_file(path: str, option: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise UsageError(f"{option} {path}: not JSON ({exc})") from exc
