"""Per-script environments (PEP 723, envs/): the block, the key, installs with uv from a folder of tiny
wheels made here (no index: no network), the cache and its bound, the `envs` command, and queries through
the connector and the real console command against the devserver."""
from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyexec_connector import errors, sandbox
from pyexec_connector.config import build_server_config
from pyexec_connector.engine.zygote import ZygoteRegistry
from pyexec_connector.envs.gate import environment_for
from pyexec_connector.envs.installer import InstallSettings
from pyexec_connector.envs.manager import EnvironmentManager, EnvironmentSettings
from pyexec_connector.envs.metadata import MetadataError, read_block
from pyexec_connector.envs.requirements import normalize
from pyexec_connector.errors import ConfigError, QueryError

from .conftest import SOURCE, TOKEN, console_command, free_port
from .wheels import make_wheel, script

READ_VERSION = "import tinyone\nversion = tinyone.VERSION\ndel tinyone\n"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(folder, "tinyone", "1.0")
    make_wheel(folder, "tinyone", "2.0")
    make_wheel(folder, "tinytwo", "1.0", requires=["tinyone>=1"], code="import tinyone\nVERSION = '1.0'\n")
    make_wheel(folder, "oldweb", "1.0", requires=["aiohttp<3"])       # clashes with the connector's aiohttp
    return folder


def settings(directory: Path, wheelhouse: Path, max_mb: int = 0) -> EnvironmentSettings:
    return EnvironmentSettings(directory, max_mb * 2**20, InstallSettings("none", (str(wheelhouse),)))


@pytest.fixture
def manager(tmp_path, wheelhouse) -> EnvironmentManager:
    return EnvironmentManager(settings(tmp_path / "environments", wheelhouse))


def run_in(python: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)


async def expect_error(code: str, text: str, manager: EnvironmentManager | None) -> QueryError:
    with pytest.raises(QueryError) as caught:
        await environment_for(text, manager)
    assert caught.value.code == code, caught.value.message()
    return caught.value


# ---- the block and the key ----------------------------------------------------------------------------

def test_block_is_read_as_the_specification_says():
    text = script("tinyone>=1", "tinytwo", requires_python=">=3.11", body="x = 1\n")
    metadata = read_block(text)
    assert metadata is not None
    assert metadata.dependencies == ("tinyone>=1", "tinytwo") and metadata.requires_python == ">=3.11"
    assert read_block("x = 1  # /// script, in a comment only\n") is None
    assert read_block("# /// script\n#\n# ///\n").dependencies == ()
    with pytest.raises(MetadataError, match="more than one"):
        read_block(text + text)
    with pytest.raises(MetadataError, match="TOML"):
        read_block("# /// script\n# dependencies = [\n# ///\n")
    with pytest.raises(MetadataError, match="list of strings"):
        read_block("# /// script\n# dependencies = \"tinyone\"\n# ///\n")


def test_sets_that_differ_only_in_spelling_are_one_environment():
    assert normalize(["Tiny_One >= 1.0", "tinytwo", "tinytwo"]) == normalize(["tinytwo", "tiny-one>=1.0"])
    assert normalize(["a[Y,x]<2,>1"]) == ("a[x,y]<2,>1",)
    with pytest.raises(MetadataError, match="not a valid requirement"):
        normalize(["tinyone >>> 1"])


async def test_a_script_cannot_choose_where_packages_come_from(manager, wheelhouse):
    wheel = wheelhouse / "tinyone-1.0-py3-none-any.whl"
    error = await expect_error(errors.BAD_SCRIPT_METADATA, script(f"tinyone @ {wheel.as_uri()}"), manager)
    assert "packageIndex" in error.message()
    assert manager.figures.installs == 0


def test_configuration_keys_and_their_environment_variables(tmp_path):
    base = {"targetServer": "http://localhost:8080", "authToken": "t", "sources": "s"}
    default = build_server_config(base, env={})
    assert default.script_dependencies is False and default.package_index is None
    assert default.package_find_links == () and default.package_source_builds is False
    assert default.environments_max_mb == 4096 and default.environments_dir.is_absolute()
    env = {"CONNECTOR_SCRIPT_DEPENDENCIES": "true", "CONNECTOR_PACKAGE_INDEX": "none",
           "CONNECTOR_PACKAGE_FIND_LINKS": "/a, https://wheels.example/b", "CONNECTOR_PACKAGE_SOURCE_BUILDS": "yes",
           "CONNECTOR_ENVIRONMENTS_DIR": str(tmp_path), "CONNECTOR_ENVIRONMENTS_MAX_MB": "100"}
    config = build_server_config(base, env=env)
    assert config.script_dependencies and config.package_index == "none" and config.package_source_builds
    assert config.package_find_links == ("/a", "https://wheels.example/b")
    assert config.environments_dir == tmp_path and config.environments_max_mb == 100
    settings = EnvironmentSettings.from_config(config)
    assert settings.max_bytes == 100 * 2**20 and settings.install.find_links == config.package_find_links
    for key, value in (("packageIndex", "pypi"), ("environmentsMaxMB", "-1"), ("scriptDependencies", "maybe")):
        with pytest.raises(ConfigError, match=key):
            build_server_config({**base, key: value}, env={})


# ---- installs ---------------------------------------------------------------------------------------------

async def test_first_use_installs_and_the_next_reuses_it(manager):
    text = script("tinyone==1.0", body=READ_VERSION)
    first = await environment_for(text, manager)
    assert first is not None and manager.figures.installs == 1 and manager.figures.hits == 0
    again = await environment_for(script("TinyOne == 1.0"), manager)       # spelled otherwise: the same set
    assert again is not None and again.key == first.key and again.path == first.path
    assert manager.figures.installs == 1 and manager.figures.hits == 1
    assert [e.key for e in manager.store.entries()] == [first.key]
    # the environment runs the package and the connector's worker, and nothing else of the base environment
    done = run_in(first.python, "import tinyone, pyexec_connector.engine.worker, aiohttp; print(tinyone.VERSION)")
    assert done.stdout.strip() == "1.0", done.stderr
    assert "numpy" in sys.modules or run_in(Path(sys.executable), "import numpy").returncode == 0
    hidden = run_in(first.python, "import numpy")
    assert hidden.returncode != 0 and "No module named 'numpy'" in hidden.stderr


async def test_a_script_without_dependencies_needs_no_environment(manager):
    assert await environment_for("x = 1", manager) is None
    assert await environment_for("# /// script\n# requires-python = '>=3'\n# ///\nx = 1\n", manager) is None
    assert manager.figures.installs == 0


async def test_two_sets_side_by_side_each_see_their_own_versions(manager):
    old = await environment_for(script("tinyone==1.0"), manager)
    new = await environment_for(script("tinytwo", "tinyone==2.0"), manager)
    assert old is not None and new is not None and old.key != new.key
    assert run_in(old.python, "import tinyone; print(tinyone.VERSION)").stdout.strip() == "1.0"
    assert run_in(new.python, "import tinyone, tinytwo; print(tinyone.VERSION)").stdout.strip() == "2.0"
    assert run_in(old.python, "import tinytwo").returncode != 0
    assert manager.figures.installs == 2


async def test_concurrent_first_uses_share_one_install(manager):
    found = await asyncio.gather(*(environment_for(script("tinytwo"), manager) for _ in range(6)))
    assert len({e.key for e in found if e is not None}) == 1
    assert manager.figures.installs == 1 and manager.installing == 0


async def test_a_missing_package_is_a_400_naming_it_and_a_later_query_tries_again(manager, wheelhouse):
    text = script("tinylater>=1")
    error = await expect_error(errors.INSTALL_FAILED, text, manager)
    assert "tinylater" in error.message() and "not found" in error.message()
    assert manager.figures.failures == 1 and manager.store.entries() == []
    assert manager.store.leftovers() == [] or all(p.suffix == ".lock" for p in manager.store.leftovers())
    make_wheel(wheelhouse, "tinylater", "1.0")
    try:
        assert await environment_for(text, manager) is not None     # not cached as a failure
        assert manager.figures.installs == 1
    finally:
        (wheelhouse / "tinylater-1.0-py3-none-any.whl").unlink()


async def test_a_conflict_with_the_connectors_own_requirements_names_both(manager):
    direct = await expect_error(errors.DEPENDENCY_CONFLICT, script("aiohttp<3"), manager)
    assert "aiohttp<3" in direct.message() and "pyexec-connector requires aiohttp" in direct.message()
    # through a dependency: the resolver finds it and says which requirement of the connector's it meets
    indirect = await expect_error(errors.DEPENDENCY_CONFLICT, script("oldweb"), manager)
    assert "aiohttp<3" in indirect.message() and "pyexec-connector" in indirect.message()
    assert manager.figures.installs == 0 and manager.store.entries() == []
    # a requirement the connector's versions meet is no conflict
    assert await environment_for(script("aiohttp>=3", "tinyone"), manager) is not None


async def test_requires_python_is_honoured(manager):
    error = await expect_error(errors.REQUIRES_PYTHON, script("tinyone", requires_python="<3"), manager)
    assert "<3" in error.message() and sys.version.split()[0] in error.message()
    # honoured with the feature off too
    await expect_error(errors.REQUIRES_PYTHON, script(requires_python=">=4"), None)
    assert await environment_for(script("tinyone", requires_python=">=3.11"), manager) is not None


async def test_scripts_with_dependencies_are_refused_when_the_feature_is_off():
    error = await expect_error(errors.DEPENDENCIES_OFF, script("tinyone"), None)
    assert "scriptDependencies" in error.message() and "tinyone" in error.message()
    assert await environment_for("x = 1", None) is None


async def test_least_recently_used_environments_go_past_environments_max_mb(tmp_path, wheelhouse):
    manager = EnvironmentManager(settings(tmp_path / "environments", wheelhouse))
    first = await environment_for(script("tinyone==1.0"), manager)
    assert first is not None
    one = first.size
    # room for two environments, not three
    bounded = EnvironmentManager(settings(tmp_path / "environments", wheelhouse, max_mb=(one * 5 // 2) // 2**20))
    second = await environment_for(script("tinyone==2.0"), bounded)
    assert second is not None and {e.key for e in bounded.store.entries()} == {first.key, second.key}
    held = bounded.lease(first)                 # in use: spared although least recently used
    assert held is not None
    third = await environment_for(script("tinytwo"), bounded)
    assert third is not None
    assert {e.key for e in bounded.store.entries()} == {first.key, third.key}
    held.release()
    fourth = await environment_for(script("tinyone==2.0", "tinytwo"), bounded)
    assert fourth is not None
    assert {e.key for e in bounded.store.entries()} == {third.key, fourth.key}
    assert bounded.figures.cache_bytes <= bounded.settings.max_bytes


async def test_a_first_use_from_a_local_wheelhouse_is_quick(manager):
    """Bench: one small wheel, a fresh cache (the connector's own wheels packed too). The bound is
    generous (a loaded machine); the figure is in docs/ENVIRONMENTS.md."""
    started = time.perf_counter()
    assert await environment_for(script("tinyone"), manager) is not None
    elapsed = time.perf_counter() - started
    print(f"first use: {elapsed:.2f} s")
    assert elapsed < 30


async def test_the_registry_keeps_a_zygote_per_interpreter(manager):
    environment = await environment_for(script("tinyone==2.0"), manager)
    assert environment is not None
    registry = ZygoteRegistry()
    try:
        base = await registry.acquire(())
        env = await registry.acquire((), python=str(environment.python))
        assert base is not env and env.python == str(environment.python)
        assert registry.zygotes() == {(): base}
        assert registry.zygotes(str(environment.python)) == {(): env}
        await registry.release(env)
        assert registry.zygotes(str(environment.python)) == {} and not env.alive and base.alive
    finally:
        await registry.close()


# ---- the command ----------------------------------------------------------------------------------------

def envs_command(tmp_path: Path, wheelhouse: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
    env.update({"CONNECTOR_ENVIRONMENTS_DIR": str(tmp_path / "environments"), "CONNECTOR_PACKAGE_INDEX": "none",
                "CONNECTOR_PACKAGE_FIND_LINKS": str(wheelhouse)})
    return subprocess.run([*console_command(), "envs", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_envs_command_prepares_lists_and_prunes(tmp_path, wheelhouse):
    (tmp_path / "one.py").write_text(script("tinyone==1.0", body=READ_VERSION))
    (tmp_path / "two.py").write_text(script("tinytwo"))
    (tmp_path / "plain.py").write_text("x = 1\n")
    prepared = envs_command(tmp_path, wheelhouse, "prepare", "one.py", "two.py", "plain.py")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert prepared.stdout.count("installed") == 2 and "plain.py: declares no dependencies" in prepared.stdout
    again = envs_command(tmp_path, wheelhouse, "prepare", "one.py")
    assert "one.py: ready" in again.stdout
    listed = envs_command(tmp_path, wheelhouse, "list")
    assert listed.returncode == 0 and listed.stdout.startswith("2 environment(s)")
    assert "tinyone==1.0" in listed.stdout and "tinytwo" in listed.stdout
    (tmp_path / "bad.py").write_text(script("nothing-of-the-kind"))
    failed = envs_command(tmp_path, wheelhouse, "prepare", "bad.py")
    assert failed.returncode == 1 and "nothing-of-the-kind" in failed.stdout
    pruned = envs_command(tmp_path, wheelhouse, "prune")
    assert pruned.returncode == 0 and pruned.stdout.startswith("removed 2 environment(s)")
    assert envs_command(tmp_path, wheelhouse, "list").stdout.startswith("0 environment(s)")


# ---- queries ------------------------------------------------------------------------------------------

async def test_off_by_default_a_query_or_document_declaring_dependencies_is_a_400(server, start_connector):
    running = await start_connector()
    assert running.connector.config.script_dependencies is False
    reply = await server.query({"code": script("tinyone", body="x = 1\n")}, timeout=30)
    assert reply.status == 400 and reply.error_code == errors.DEPENDENCIES_OFF
    assert "scriptDependencies" in reply.body["messageTemplate"]
    server.put_document("needs.py", script("tinyone", body="x = 1\n"))
    document = await server.query({"script": "needs.py"}, timeout=30)
    assert document.status == 400 and document.error_code == errors.DEPENDENCIES_OFF
    server.put_document("plain.py", "# /// script\n# requires-python = '>=3'\n# ///\nx = 2\n")
    assert (await server.query({"script": "plain.py"}, timeout=30)).results == {"x": 2}


async def test_an_idle_environment_scales_to_zero_and_can_then_be_pruned(tmp_path, server, start_connector,
                                                                          wheelhouse):
    server.set_source_config(SOURCE, {"workerIdleSeconds": 0.3})
    running = await start_connector(scriptDependencies="true", packageIndex="none", packageFindLinks=wheelhouse,
                                    environmentsDir=tmp_path / "environments")
    reply = await server.query({"code": script("tinyone==2.0", body=READ_VERSION)}, timeout=60)
    assert reply.results == {"version": "2.0"}, reply.body
    assert running.session.environments_in_use == 1
    manager = running.connector.environments
    assert manager is not None
    (entry,) = manager.store.entries()
    assert not manager.store.remove_if_unused(entry.key)         # in use: not removed
    async with asyncio.timeout(20):
        while running.session.environments_in_use:
            await asyncio.sleep(0.1)
    async with asyncio.timeout(20):                              # its engine retired, its lease given back
        while not manager.store.remove_if_unused(entry.key):
            await asyncio.sleep(0.1)
    # the next query installs it again and runs
    again = await server.query({"code": script("tinyone==2.0", body=READ_VERSION)}, timeout=60)
    assert again.results == {"version": "2.0"} and manager.figures.installs == 2


async def test_first_queries_wait_for_one_install_within_their_own_timeout(tmp_path, server, start_connector,
                                                                            wheelhouse):
    """The wheel folder is served over HTTP, slowly: a query whose timeout passes first is answered with the
    timeout error while the install goes on; queries meanwhile share that one install."""
    from aiohttp import web

    release = asyncio.Event()

    async def listing(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text='<a href="tinyone-2.0-py3-none-any.whl">tinyone-2.0-py3-none-any.whl</a>',
                            content_type="text/html")

    async def wheel(request: web.Request) -> web.FileResponse:
        return web.FileResponse(wheelhouse / request.match_info["name"])

    app = web.Application()
    app.add_routes([web.get("/wheels/", listing), web.get("/wheels/{name}", wheel)])
    runner = web.AppRunner(app)
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await web.SockSite(runner, listener).start()
    try:
        running = await start_connector(scriptDependencies="true", packageIndex="none",
                                        packageFindLinks=f"http://127.0.0.1:{port}/wheels/",
                                        environmentsDir=tmp_path / "environments")
        code = script("tinyone==2.0", body=READ_VERSION)
        started = time.perf_counter()
        hasty = await server.query({"code": code, "timeout": 0.5}, timeout=30)
        assert hasty.error_code == errors.TIMEOUT and time.perf_counter() - started < 10, hasty.body
        patient = [asyncio.ensure_future(server.query({"code": code}, timeout=60)) for _ in range(3)]
        await asyncio.sleep(0.5)
        release.set()
        for reply in await asyncio.gather(*patient):
            assert reply.results == {"version": "2.0"}, reply.body
        manager = running.connector.environments
        assert manager is not None and manager.figures.installs == 1 and manager.figures.failures == 0
    finally:
        release.set()
        await runner.cleanup()


async def test_start_up_hooks_of_a_scripts_packages_run_only_in_a_hardened_process(tmp_path, server,
                                                                                    start_connector):
    """A package's .pth file runs when an interpreter of its environment starts. In the environment's
    zygote it runs after the process hardened itself (with workerUser: after it became that user), not
    before, as the connector's user: PR_SET_NO_NEW_PRIVS, set by that step, is already on when it runs."""
    assert not sandbox.no_new_privs()          # the test itself runs without it
    wheels, seen = tmp_path / "wheels", tmp_path / "hook-ran-with"
    hook = (f"import sys; open({str(seen)!r}, 'a').write(next(line for line in open('/proc/self/status') "
            f"if line.startswith('NoNewPrivs')))\n")
    make_wheel(wheels, "hooky", "1.0", extra={"hooky.pth": hook})
    await start_connector(scriptDependencies="true", packageIndex="none", packageFindLinks=wheels,
                          environmentsDir=tmp_path / "environments")
    reply = await server.query({"code": script("hooky", body="import hooky\nx = 1\n")}, timeout=60)
    assert reply.results == {"x": 1}, reply.body
    lines = seen.read_text().splitlines()
    assert lines and all(line.split() == ["NoNewPrivs:", "1"] for line in lines), lines


HARDENED_USER = "pyexec-envtest"


@pytest.fixture
def hardened():
    """(command, extra environment, a folder every user may traverse, the worker user's entry) for the
    console command as root with workerUser; skipped when not root."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    try:
        entry = pwd.getpwnam(HARDENED_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", HARDENED_USER],
                       check=True, capture_output=True, timeout=60)
        entry = pwd.getpwnam(HARDENED_USER)
    command, extra = console_command(), {}
    if sandbox.unreachable_python(entry.pw_uid, entry.pw_gid) is not None:      # a pyenv under /root, say
        system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        if not system.exists():
            pytest.skip("no interpreter the worker user can read")
        command = [str(system), "-m", "pyexec_connector"]
        extra = {"PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"],
                                                str(Path(sandbox.__file__).resolve().parent.parent)])}
    base = Path(tempfile.mkdtemp(prefix="pyexec-envs-", dir="/tmp"))
    base.chmod(0o755)
    (base / "hooks").mkdir()
    (base / "hooks").chmod(0o777)
    try:
        yield command, extra, base, entry
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_hardened_mode_runs_environments_and_their_hooks_as_the_worker_user(server, hardened):
    """The real command as root with workerUser: the environment's workers, and its packages' start-up
    hooks, run as the worker user; PYTHONPATH given to the connector does not reach the environment."""
    command, extra, base, entry = hardened
    record = base / "hooks" / "uids"
    make_wheel(base / "wheels", "hooky", "1.0",
               extra={"hooky.pth": f"import os; open({str(record)!r}, 'a').write(f'{{os.getuid()}}\\n')\n"})
    config = base / "server.config"
    config.write_text(
        f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\nworkerUser = {HARDENED_USER}\n"
        f"scriptDependencies = true\npackageIndex = none\npackageFindLinks = {base / 'wheels'}\n"
        f"environmentsDir = {base / 'environments'}\n")
    config.chmod(0o600)
    proc = await asyncio.create_subprocess_exec(*command, "--config", str(config), cwd=base,
                                                env={**os.environ, **extra}, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        body = "import os, sys, hooky\nuid = os.getuid()\nseen = [p for p in sys.path if 'site-packages' in p]\n"
        reply = await server.query({"code": script("hooky", body=body)}, timeout=60)
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert reply.status == 200, (reply.body, output.decode()[-3000:])
    assert reply.results["uid"] == entry.pw_uid
    assert reply.results["seen"] and all("/environments/envs/" in p for p in reply.results["seen"]), reply.results
    assert set(record.read_text().split()) == {str(entry.pw_uid)}


async def test_inline_mode_refuses_scripts_with_dependencies(tmp_path, server, start_connector, wheelhouse):
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    await start_connector(scriptDependencies="true", packageIndex="none", packageFindLinks=wheelhouse,
                          environmentsDir=tmp_path / "environments")
    reply = await server.query({"code": script("tinyone", body="x = 1\n")}, timeout=60)
    assert reply.error_code == errors.DEPENDENCIES_INLINE and "inline" in str(reply.body)
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


async def test_console_command_runs_scripts_in_their_environments(tmp_path, server, wheelhouse):
    """End to end: the real command against the devserver, feature on; code and documents, reuse, two
    sets, isolation, errors, a worker killed and replaced, and /metrics."""
    port = free_port()
    (tmp_path / "serverConfig").mkdir()
    (tmp_path / "serverConfig" / "server.config").write_text(
        f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\nmetricsPort = {port}\n"
        f"scriptDependencies = true\npackageIndex = none\npackageFindLinks = {wheelhouse}\n"
        f"environmentsDir = {tmp_path / 'environments'}\n")
    proc = await asyncio.create_subprocess_exec(*console_command(), cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        one = await server.query({"code": script("tinyone==1.0", body=READ_VERSION)}, timeout=60)
        assert one.status == 200 and one.results == {"version": "1.0"}, one.body
        server.put_document("two.py", script("tinyone==2.0", "tinytwo", body=READ_VERSION))
        two = await server.query({"script": "two.py"}, timeout=60)
        assert two.results == {"version": "2.0"}, two.body
        server.put_document("plain.py", "x = 3")
        assert (await server.query({"script": "plain.py"}, timeout=30)).results == {"x": 3}
        again = await server.query({"code": script("tinyone==1.0", body=READ_VERSION + "n = 1\n")}, timeout=30)
        assert again.results == {"version": "1.0", "n": 1}, again.body
        hidden = await server.query({"code": script("tinyone==1.0", body="import numpy\n")}, timeout=30)
        assert hidden.status == 400 and "numpy" in str(hidden.body)
        assert (await server.query({"code": "import numpy\nx = 1"}, timeout=30)).results == {"x": 1}  # base env
        missing = await server.query({"code": script("nothing-of-the-kind")}, timeout=60)
        assert missing.error_code == errors.INSTALL_FAILED and "nothing-of-the-kind" in str(missing.body)
        clash = await server.query({"code": script("aiohttp<3")}, timeout=30)
        assert clash.error_code == errors.DEPENDENCY_CONFLICT
        killed = await server.query({"code": script("tinyone==1.0", body="import os, signal\n"
                                                                          "os.kill(os.getpid(), signal.SIGKILL)\n")},
                                    timeout=30)
        assert killed.status == 400 and killed.error_code == errors.WORKER_DIED, killed.body
        after = await server.query({"code": script("tinyone==1.0", body=READ_VERSION)}, timeout=30)
        assert after.results == {"version": "1.0"}, after.body
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["pyexec_environment_installs_total"] == 2
        assert samples["pyexec_environment_hits_total"] >= 2
        assert samples["pyexec_environment_install_failures_total"] == 1
        assert samples["pyexec_environment_install_seconds_total"] > 0
        assert samples["pyexec_environment_cache_bytes"] > 0
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = output.decode()
    assert proc.returncode == 0, text
    assert TOKEN not in text


def test_an_environment_engine_is_a_process_engine_of_idle_workers_also_for_an_inline_source():
    """The environment is another interpreter: its engine is a process engine whatever the source's mode,
    and holds no worker while nobody uses it."""
    from pyexec_connector.config import SourceConfig
    from pyexec_connector.envs.engines import environment_config
    inline, problems = SourceConfig.parse({"executionMode": "inline", "minWorkers": 1})
    assert inline is not None and not problems
    config = environment_config(inline)
    assert config.executionMode == "process" and config.minWorkers == 0
