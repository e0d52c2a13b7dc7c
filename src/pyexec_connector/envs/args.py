"""The `envs` command's arguments, apart from the command itself: cli builds every parser, healthcheck's
too, so this module imports nothing heavy (the command's code, asyncio and pydantic, load when it runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    envs = sub.add_parser("envs", help="list, prepare or prune per-script environments (PEP 723)",
                          description="Per-script environments (docs/ENVIRONMENTS.md), with the settings of "
                                      "server.config and CONNECTOR_* variables.")
    commands = envs.add_subparsers(dest="envs_command", metavar="ACTION", required=True)
    listing = commands.add_parser("list", help="the environments in environmentsDir, least recently used first")
    prepare = commands.add_parser("prepare", help="install the environments the scripts' blocks declare",
                                  description="Read each file's '# /// script' block and install its "
                                              "environment now (for example in a Dockerfile step).")
    prepare.add_argument("files", metavar="FILE", nargs="+", type=Path)
    prune = commands.add_parser("prune", help="remove environments no process is using",
                                description="Remove every environment no running connector uses, and what "
                                            "failed installs left behind; with --max-mb, only the least "
                                            "recently used ones until the rest fit.")
    prune.add_argument("--max-mb", type=int, default=None, metavar="MB",
                       help="keep the most recently used environments that fit in MB megabytes")
    for parser in (listing, prepare, prune):
        parser.add_argument("--config", metavar="PATH", default=None, help="the server.config file")
