"""The README is what a new user follows literally: it stays short, in the order a user needs it, and
every command it shows is real (the subcommands and options exist, the files it names are there, the
outputs it shows are what the command prints)."""
from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest

from .conftest import ROOT, console_command

README = ROOT / "README.md"
MAX_LINES = 300
SECTIONS = [
    "What it is",
    "Install",
    "Load the source type and configure",
    "Write queries",
    "Migrate from vantiqPythonExecConnector",
    "Operate it",
    "Links",
]
# Commands a README block may use that cannot run here (no Vantiq CLI, no container engine): their
# file arguments are still checked.
NOT_RUN_HERE = {"vantiq", "docker", "kubectl"}


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)]


def commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `&&` split."""
    joined = text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if words:
                found.append(words)
    return found


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def help_text(*subcommand: str) -> str:
    done = subprocess.run([*console_command(), *subcommand, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"pyexec-connector {' '.join(subcommand)} --help: {done.stderr}"
    return done.stdout


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_readme_sections_come_in_a_users_order():
    headings = re.findall(r"^## (.+)$", README.read_text(), re.M)
    assert headings == SECTIONS


def test_readme_install_for_production_comes_before_the_developers_setup():
    text = README.read_text()
    install = text.index("## Install")
    production = text.index('pip install ".[speed]"', install)
    docker = text.index("docker build", install)
    developers = text.index('pip install -e ".[test,bench,speed]"', install)
    assert production < docker < developers < text.index("## Load the source type")


def test_readme_test_command_is_what_ci_runs():
    """.ci/run installs what the README's developer set-up installs, and ends with its test command."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme_commands = [c for _, text in blocks(README) if _ == "bash" for c in commands(text)]
    assert ["pytest"] in readme_commands
    assert [line for line in ci if line.strip() and not line.startswith("#")][-1] == "pytest"
    (dev_install,) = [c for c in readme_commands if c[:3] == ["pip", "install", "-e"]]
    assert any(f'pip install --quiet -e "{dev_install[3]}"' in line for line in ci)


@pytest.mark.parametrize("block", [text for lang, text in blocks(README) if lang == "bash"])
def test_readme_bash_commands_are_real(block):
    extras = set(pyproject()["project"]["optional-dependencies"])
    for words in commands(block):
        program, args = words[0], words[1:]
        if program == "pyexec-connector":
            sub = [a for a in args if not a.startswith("-")][:1] if args and not args[0].startswith("-") else []
            usage = help_text(*sub)
            for option in (a.split("=")[0] for a in args if a.startswith("--")):
                assert option in usage, f"pyexec-connector {' '.join(sub)} has no option {option}"
        elif program == "pip" and args[:1] == ["install"]:
            for target in args[1:]:
                match = re.fullmatch(r"\.\[([\w,]+)\]", target)
                if match:
                    assert set(match[1].split(",")) <= extras, target
        elif program == "pip" and args[:1] == ["uninstall"]:
            scripts = pyproject()["project"]["scripts"]
            assert args[1] in scripts, "the README's reason to uninstall upstream: we install its command too"
        elif program == "cp":
            assert (ROOT / args[0]).is_file(), args[0]
            continue
        elif program == ".":             # activating the venv the line before made
            assert args[0].startswith(".venv/"), args
            continue
        elif program not in NOT_RUN_HERE | {"python3", "export", "pytest"}:
            raise AssertionError(f"the README's command {program!r} is not checked by this test: add it")
        for arg in args:
            if re.fullmatch(r"[\w.-]+(/[\w.-]+)+", arg) and not arg.startswith("-"):
                assert (ROOT / arg).exists(), f"{' '.join(words)}: {arg} does not exist"


def test_readme_exec_examples_print_what_the_readme_shows(tmp_path):
    """A bash block with one `pyexec-connector exec` command followed by a text block: the text is what
    the command prints (stdout, then stderr)."""
    pairs = blocks(README)
    checked = 0
    for (lang, text), (next_lang, shown) in zip(pairs, pairs[1:], strict=False):
        found = commands(text) if lang == "bash" else []
        if next_lang != "text" or len(found) != 1 or found[0][:2] != ["pyexec-connector", "exec"]:
            continue
        done = subprocess.run([*console_command(), *found[0][1:]], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert done.stdout + done.stderr == shown, f"{text}printed:\n{done.stdout}{done.stderr}"
        checked += 1
    assert checked >= 2


def test_readme_testing_example_runs(tmp_path, monkeypatch):
    """The pyexec_connector.testing snippet, as a user's test file would hold it, with its script."""
    (snippet,) = [text for lang, text in blocks(README) if lang == "python" and "pyexec_connector.testing" in text]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "total.py").write_text("total = sum(values)\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)      # noqa: S102 - the README's own example
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_documentation_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"\w+://", target):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_operations_environment_example_is_the_real_message(tmp_path):
    """docs/OPERATIONS.md shows the message a bad value from the environment gets: it is the real one."""
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    match = re.search(r"```text\n\$ (CONNECTOR_SEND_PINGS=\S+) (pyexec-connector check)\n(.*?)\n```", text, re.S)
    assert match, "the example is gone from docs/OPERATIONS.md"
    (tmp_path / "serverConfig").mkdir()
    (tmp_path / "serverConfig" / "server.config").write_text(
        "targetServer = https://dev.vantiq.example\nsources = pythonSource\n")
    variable, value = match[1].split("=", 1)
    env = {"PATH": str(Path(console_command()[0]).parent) + ":/usr/bin:/bin", "CONNECTOR_AUTH_TOKEN": "t0k3n-for-docs",
           variable: value}
    done = subprocess.run([*console_command(), "check"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=env)
    assert done.returncode == 2
    assert match[3] in done.stdout.splitlines(), done.stdout
