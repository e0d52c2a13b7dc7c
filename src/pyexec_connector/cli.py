"""The console command: `pyexec-connector [run|demo]`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__
from .config import ServerConfig, load_server_config
from .connector import Connector
from .errors import AuthenticationError, ConfigError
from .link import ConnectionFailed
from .logsetup import configure_logging, redact_everywhere

log = logging.getLogger("pyexec_connector")

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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connector_options(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="connect every source in server.config and serve queries (the default)",
                         description="Connect every source listed in server.config and serve queries until "
                                     "stopped (SIGINT/SIGTERM).")
    _connector_options(run, argparse.SUPPRESS)
    demo = sub.add_parser("demo", help="a full round trip against a built-in loopback stand-in of Vantiq",
                          description="Start the built-in stand-in of a Vantiq server on a free loopback port, "
                                      "connect the connector to it and run example queries, printing each "
                                      "query and its reply. Needs no configuration and no account.")
    demo.add_argument("--log-level", default=argparse.SUPPRESS,
                      help="log level while the demo runs (default WARNING)")
    return parser


def _connector_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="the server.config file (default: serverConfig/server.config, then ./server.config)")
    parser.add_argument("--log-level", metavar="LEVEL", default=default,
                        help="override the log level: DEBUG, INFO, WARNING or ERROR")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "demo":
        from .demo import run_demo
        return run_demo(log_level=getattr(args, "log_level", None) or "WARNING")
    return run_connector(getattr(args, "config", None), getattr(args, "log_level", None))


def run_connector(config_path: str | None, log_level: str | None) -> int:
    try:
        config = load_server_config(config_path)
    except ConfigError as exc:
        print(f"pyexec-connector: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging_source = configure_logging(log_level)
    redact_everywhere(config.auth_token)
    log.info("pyexec-connector %s starting; logging: %s", __version__, logging_source)
    return asyncio.run(serve(config))


async def serve(config: ServerConfig) -> int:
    connector = Connector(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, connector.stop)
        except (NotImplementedError, RuntimeError):   # not the main thread, or not POSIX
            pass
    try:
        await connector.run()
    except AuthenticationError as exc:
        log.error("%s", exc)
        return EXIT_AUTH
    except ConnectionFailed as exc:
        log.error("%s (failOnConnectionError is true, so the connector stops)", exc)
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
