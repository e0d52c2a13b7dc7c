"""The console command: `pyexec-connector [run|check|demo|exec|healthcheck]`."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from . import execute, logqueue, sandbox, version
from .configfile import read_config_sources
from .errors import ConfigError
from .logsetup import LOG_FORMATS

# `healthcheck` (Docker runs it every few seconds) must start light: websockets, aiohttp, pydantic and the
# engine are imported by the commands that use them, not here.
if TYPE_CHECKING:
    from .config import ServerConfig
    from .link import CheckResult

log = logging.getLogger("pyexec_connector")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Version(argparse.Action):
    """--version, read from the package metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def _log_level(text: str) -> str:
    """--log-level, any case; a word logging does not know is argparse's error (exit 2), not a traceback."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: choose from {', '.join(LOG_LEVELS)}")
    return level

EXIT_OK = 0
EXIT_FAILURE = 1        # could not connect and failOnConnectionError is set, or an unexpected error
EXIT_CONFIG = 2         # server.config (or the environment) is wrong
EXIT_AUTH = 3           # the server refused the access token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyexec-connector",
        description="Run Python for a Vantiq server: answers SELECT ... FROM SOURCE <source> WITH code = ... "
                    "queries. A drop-in replacement for vantiqPythonExecConnector. With no command, runs.",
        epilog="Exit codes: 0 stopped cleanly, 1 connection failed (failOnConnectionError) or internal "
               "error, 2 configuration error, 3 access token refused.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _connector_options(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="connect every source in server.config and serve queries (the default)",
                         description="Connect every source listed in server.config and serve queries until "
                                     "stopped (SIGINT/SIGTERM).")
    _connector_options(run, argparse.SUPPRESS)
    check = sub.add_parser("check", aliases=["doctor"],
                           help="check the configuration and each source's handshake, then exit",
                           description="Read the configuration (server.config and CONNECTOR_* environment "
                                       "variables) and report every problem with its key; then, for each "
                                       "source, try the handshake (validate, connectExtension, "
                                       "configureExtension) once and print one line: connected, bad token, "
                                       "source unknown, refused, host unreachable or TLS failure. Exit code 0 "
                                       "only when everything passes (2: configuration, 3: token refused, "
                                       "1: any other failure).")
    check.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="the server.config file")
    check.add_argument("--timeout", metavar="SECONDS", type=float, default=15.0,
                       help="how long each handshake may take (default 15)")
    health = sub.add_parser("healthcheck", help="ask the running connector's /healthz (for Docker's HEALTHCHECK)",
                            description="GET /healthz on 127.0.0.1:<metricsPort> of the configuration; exit 0 "
                                        "when it answers 200, 1 otherwise. With no metricsPort configured there "
                                        "is nothing to ask, and the answer is 0.")
    health.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="the server.config file")
    demo = sub.add_parser("demo", help="a full round trip against a built-in loopback stand-in of Vantiq",
                          description="Start the built-in stand-in of a Vantiq server on a free loopback port, "
                                      "connect the connector to it and run example queries, printing each "
                                      "query and its reply. Needs no configuration and no account.")
    demo.add_argument("--log-level", metavar="LEVEL", type=_log_level, default=argparse.SUPPRESS,
                      help="log level while the demo runs (default WARNING)")
    execute.add_parser(sub)
    _envs_parser(sub)
    return parser


def _envs_parser(sub: Any) -> None:
    from .envs.args import add_parser
    add_parser(sub)


def _connector_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="the server.config file (default: serverConfig/server.config, then ./server.config)")
    parser.add_argument("--log-level", metavar="LEVEL", type=_log_level, default=default,
                        help="override the log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=default,
                        help="text (default) or json: one JSON object per line (serverConfig/logger.ini, "
                             "when present, wins)")


def main(argv: list[str] | None = None) -> int:
    # before the token is read: processes of this user (user code in default process mode among them)
    # cannot read this one's /proc/<pid>/environ, mem or maps, nor ptrace it
    sandbox.make_non_dumpable()
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "demo":
        from .demo import run_demo
        return run_demo(log_level=getattr(args, "log_level", None) or "WARNING")
    if command == "exec":
        return execute.main(args)
    if command in ("check", "doctor"):
        return run_check(getattr(args, "config", None), args.timeout)
    if command == "healthcheck":
        return run_healthcheck(getattr(args, "config", None))
    if command == "envs":
        try:    # the command's code needs the envs extra's packages; its parser does not
            from .envs.command import run as run_envs
        except ImportError as exc:
            print(f"pyexec-connector envs: {exc}: install pyexec-connector[envs]", file=sys.stderr)
            return EXIT_CONFIG
        return run_envs(args)
    return run_connector(getattr(args, "config", None), getattr(args, "log_level", None),
                         getattr(args, "log_format", None) or "text")


def run_check(config_path: str | None, timeout: float) -> int:
    """`pyexec-connector check`: every configuration problem, then one handshake line per source."""
    import asyncio

    from .config import config_problems, config_warnings
    try:
        properties, file = read_config_sources(config_path)
    except ConfigError as exc:
        print(f"configuration: {exc}")
        return EXIT_CONFIG
    config, problems = config_problems(properties, file=file)
    where = file or "no server.config: everything from CONNECTOR_* variables"
    for warning in config_warnings(properties, file=file):
        print(f"warning: {warning}")
    if problems:
        for problem in problems:
            print(f"configuration: {problem}")
        return EXIT_CONFIG
    assert config is not None
    print(f"configuration: ok ({where}); target {config.websocket_url}")
    exposure = _token_exposure(properties, file, config)
    if exposure:
        print(f"warning: {exposure}")
    logging.basicConfig(level=logging.CRITICAL)    # the lines below say everything; no log noise
    results = asyncio.run(_check_sources(config, timeout))
    width = max(len(name) for name in results)
    for name, result in results.items():
        print(f"source {name:<{width}}  {result.outcome}: {result.detail}")
    if all(r.ok for r in results.values()):
        return EXIT_OK
    return EXIT_AUTH if any(r.outcome == "bad token" for r in results.values()) else EXIT_FAILURE


def _token_exposure(properties: dict[str, str], file: str | None, config: ServerConfig) -> str | None:
    if file is None or str(properties.get("authToken") or "").strip() != config.auth_token:
        return None     # the token in use is not the file's (none there, or a placeholder the environment replaced)
    return sandbox.token_file_exposure(file, config.worker_credentials)


def run_healthcheck(config_path: str | None) -> int:
    """0 healthy, 1 anything else: Docker reserves every other exit code of a HEALTHCHECK. It reads
    metricsPort alone: the rest of the configuration is the running connector's to have checked."""
    import urllib.error
    import urllib.request

    from .configfile import raw_value
    try:
        text, where = raw_value("metricsPort", config_path)
        port = None if text is None else int(text)
        if port is not None and not 1 <= port <= 65535:
            raise ValueError
    except ConfigError as exc:
        print(f"configuration error: {exc}")
        return EXIT_FAILURE
    except ValueError:
        print(f"configuration error: {where}: key 'metricsPort': must be a port (1-65535), not {text!r}")
        return EXIT_FAILURE
    if port is None:
        print("metricsPort is not set: no /healthz to ask")
        return EXIT_OK
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:      # noqa: S310 - loopback, fixed scheme
            print(f"{url}: {response.status}")
            return EXIT_OK if response.status == 200 else EXIT_FAILURE
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}")
    return EXIT_FAILURE


async def _check_sources(config: ServerConfig, timeout: float) -> dict[str, CheckResult]:
    import uuid

    from .link import SourceLink
    secret = config.reconnect_secret or uuid.uuid4().hex
    results = {}
    for name in config.sources:      # one after the other: the lines come out in the file's order
        link = SourceLink(name, config, _NoQueries(), reconnect_secret=f"{name}_{secret}",
                          handshake_timeout=timeout)
        result = await link.check()
        results[name] = await _check_source_config(config, result) if result.ok else result
    return results


async def _check_source_config(config: ServerConfig, result: CheckResult) -> CheckResult:
    """The source configuration the server sent, as the connector would take it: its errors, and its
    preload list imported by a zygote started the way the connector starts one (a module that fails to
    import is named here rather than found at the first query)."""
    from .config import source_config_problems
    from .engine.zygote import PreloadError, Zygote, ZygoteError
    from .link import CheckResult
    source_config, errors, warnings = source_config_problems(result.config)
    if source_config is None:
        return CheckResult("bad configuration", "; ".join(errors + warnings), result.config)
    detail = "; ".join([result.detail, *warnings])
    if source_config.executionMode == "inline" or not source_config.preload:
        return CheckResult(result.outcome, detail, result.config)
    zygote = Zygote(source_config.preload, sandbox.worker_spawn_options(config.worker_credentials))
    try:
        await zygote.start()
    except PreloadError as exc:
        return CheckResult("preload failed", str(exc), result.config)
    except ZygoteError as exc:
        return CheckResult("preload failed", f"pythonExecConfig.general.preload: {exc}", result.config)
    finally:
        await zygote.stop()
    return CheckResult(result.outcome, f"{detail}; preload imported: {', '.join(source_config.preload)}",
                       result.config)


class _NoQueries:
    """`check` only handshakes: a query or configuration that comes meanwhile is ignored."""

    def on_query(self, frame: Any) -> None: ...
    def on_configure(self, config: Any) -> None: ...
    def on_unreadable_query(self, reply_address: str, error: Any) -> None: ...


def run_connector(config_path: str | None, log_level: str | None, log_format: str = "text") -> int:
    import asyncio

    from .config import ENV_FOR_KEY, TOKEN_ENV, config_problems, config_warnings
    from .eventloop import event_loop_factory
    from .logsetup import configure_logging, redact_everywhere
    try:
        properties, file = read_config_sources(config_path)
    except ConfigError as exc:
        print(f"pyexec-connector: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config, problems = config_problems(properties, file=file)
    warnings = config_warnings(properties, file=file)
    if problems or config is None:
        for warning in warnings:        # a typo'd key is often why a required one is missing
            print(f"pyexec-connector: configuration warning: {warning}", file=sys.stderr)
        for problem in problems:        # every problem at once: one start to find them all
            print(f"pyexec-connector: configuration error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    # Building the configuration models left freed heap behind (~0.9 MiB): back to the system before serving.
    sandbox.trim_heap()
    # User code runs in this process (and its children inherit the environment): it must not find the token.
    for secret in (TOKEN_ENV, ENV_FOR_KEY["reconnectSecret"]):
        os.environ.pop(secret, None)
    logging_source = configure_logging(log_level, log_format=log_format)
    redact_everywhere(config.auth_token)
    exposure = _token_exposure(properties, file, config)
    if exposure:
        log.warning("%s", exposure)
    for warning in warnings:
        log.warning("%s", warning)
    loop_factory, loop_name = event_loop_factory(warn=log.warning)
    log.info("pyexec-connector %s starting; logging: %s; event loop: %s", version(), logging_source, loop_name)
    # What the imports and the configuration made lives as long as the process: out of the collector's full
    # passes, which would otherwise walk all of it again every few thousand queries.
    gc.freeze()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        code = runner.run(serve(config))
    if not logqueue.stop():
        # The log output takes nothing (a pipe nobody reads): exiting normally would wait on it forever
        # (logging's and the interpreter's final flush). The lines still queued are lost either way.
        os._exit(code)
    return code


async def serve(config: ServerConfig) -> int:
    from .engine import hygiene
    hygiene.start()     # nothing started under the connector outlives it (issue 21)
    try:
        return await _serve(config)
    finally:
        hygiene.stop()


async def _serve(config: ServerConfig) -> int:
    import asyncio

    from .connector import Connector
    from .engine import hygiene
    from .errors import AuthenticationError
    from .link import ConnectionFailed
    connector = Connector(config)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s received: shutting down gracefully (send it again to exit at once)", sig.name)
            connector.stop()
            return
        log.warning("%s received again: exiting at once; in-flight queries are not answered", sig.name)
        hygiene.stop()
        if logqueue.stop(timeout=1.0):
            logging.shutdown()
        os._exit(EXIT_FAILURE)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):   # not the main thread, or not POSIX
            pass
    try:
        await connector.run()
    except AuthenticationError as exc:
        log.error("%s", exc)
        return EXIT_AUTH
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    except ConnectionFailed as exc:
        log.error("%s (failOnConnectionError is true, so the connector stops)", exc)
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
