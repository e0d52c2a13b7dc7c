"""The Docker image and the Kubernetes manifests: no Docker engine or cluster here, so the Dockerfile is
parsed (the `dockerfile` package) and the YAML loaded, and the image's install steps are replayed in a
fresh venv (slow: run with `pytest -m slow`, as .ci/run does)."""
from __future__ import annotations

import asyncio
import json
import logging.config
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import yaml

from pyexec_connector.config import build_server_config, read_properties
from pyexec_connector.errors import ConfigError

from .conftest import ROOT, SOURCE, TOKEN, console_command, free_port

K8S = ROOT / "deploy" / "kubernetes"


def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def first(cmd: str) -> list[dockerfile.Command]:
    return [c for c in instructions() if c.cmd == cmd]


def test_dockerfile_base_user_and_entrypoint():
    commands = instructions()
    (base,) = first("FROM")
    image, _, tag = base.value[0].partition(":")
    assert image == "python" and tag.endswith("-slim")
    users = first("USER")
    assert users and users[-1].value[0] not in ("root", "0")
    names = [c.cmd for c in commands]
    assert names.index("USER") > max(i for i, c in enumerate(commands) if c.cmd == "RUN" and "pip" in c.value[0])
    (entry,) = first("ENTRYPOINT")
    assert entry.json and entry.value == ("tini", "--", "pyexec-connector")     # an init reaps orphans
    (volume,) = first("VOLUME")
    assert any(v.rstrip("/").endswith("/serverConfig") for v in volume.value)
    (workdir,) = first("WORKDIR")
    assert volume.value[0].startswith(workdir.value[0])        # serverConfig/ relative to the working dir


def test_dockerfile_resolves_local_requirements_with_the_projects_dependencies():
    assert (ROOT / "localRequirements.txt").is_file()
    commands = instructions()
    copies = [c for c in commands if c.cmd == "COPY"]
    runs = [c.value[0] for c in commands if c.cmd == "RUN"]
    assert any("localRequirements.txt" in c.value[:-1] and "pyproject.toml" in c.value[:-1] for c in copies)
    # one pip command over both lists: a conflict is pip's error, not a silent replacement
    (resolve,) = [r for r in runs if "localRequirements.txt" in r]
    assert re.search(r"pip install -r \S*localRequirements\.txt -r \S*project\.txt", resolve)
    sources = {v for c in copies for v in c.value[:-1]}
    assert {"pyproject.toml", "src"} <= sources                # the project from the build context
    (project,) = [r for r in runs if "/tmp/build" in r and "pip install" in r]
    assert "--no-deps" in project and "pip check" in project   # it cannot replace what was resolved
    assert runs.index(resolve) < runs.index(project)           # users' packages in their own, earlier layer


def test_dockerfile_healthcheck_asks_healthz():
    (check,) = first("HEALTHCHECK")
    assert "pyexec-connector" in check.original and "healthcheck" in check.original
    env = dict(zip(first("ENV")[0].value[::2], first("ENV")[0].value[1::2], strict=True))
    assert env["CONNECTOR_METRICS_PORT"].isdigit()              # the endpoints are on in the image


async def test_healthcheck_command(server, tmp_path):
    port = free_port()
    config = tmp_path / "server.config"
    config.write_text(f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\nmetricsPort = {port}\n")

    async def healthcheck() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(*console_command(), "healthcheck", "--config", str(config),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    code, out = await healthcheck()
    assert code == 1, out                                      # nothing listening yet
    connector = await asyncio.create_subprocess_exec(*console_command(), "--config", str(config), cwd=tmp_path,
                                                     stdout=asyncio.subprocess.DEVNULL)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        code, out = await healthcheck()
        assert code == 0 and "/healthz: 200" in out
    finally:
        connector.terminate()
        assert await asyncio.wait_for(connector.wait(), 30) == 0


def replay_image_install(tmp_path: Path, local_requirements: str | None = None) -> tuple[Path, str | None]:
    """Replay the Dockerfile's COPY steps and its RUN steps that call pip or python, in a fresh venv
    standing in for the image. Returns (the venv, None) or (the venv, the failing step and its output)."""
    context = tmp_path / "context"
    root = tmp_path / "root"                                    # stands in for the image's filesystem
    ignored = shutil.ignore_patterns(".venv", ".venv-upstream", ".git", "__pycache__", "*.egg-info", "build",
                                     "dist")
    shutil.copytree(ROOT, context, ignore=ignored)
    if local_requirements is not None:
        (context / "localRequirements.txt").write_text(local_requirements)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    for command in instructions():
        if command.cmd == "COPY":
            *sources, dest = command.value
            target = root / dest.lstrip("/")
            for source in sources:
                path = context / source
                if dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    destination = target / path.name
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    destination = target
                if path.is_dir():
                    shutil.copytree(path, destination)
                else:
                    shutil.copy(path, destination)
        elif command.cmd == "RUN" and re.search(r"\b(pip|python3?) ", command.value[0]):
            line = command.value[0].replace("/tmp/", f"{root}/tmp/")
            done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                return venv, f"{line}\n{done.stdout}\n{done.stderr}"
    return venv, None


@pytest.mark.slow
def test_image_install_steps_in_a_fresh_venv(tmp_path):
    """The image's install steps, then `pyexec-connector --help`; the image runs on uvloop, as measured."""
    venv, failed = replay_image_install(tmp_path)
    assert failed is None, failed
    help_text = subprocess.run([str(venv / "bin" / "pyexec-connector"), "--help"], capture_output=True, text=True,
                               timeout=60)
    assert help_text.returncode == 0 and "check" in help_text.stdout
    probe = "from pyexec_connector.eventloop import event_loop_factory; print(event_loop_factory()[1])"
    loop = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYEXEC_EVENT_LOOP"})
    assert loop.stdout.startswith("uvloop "), loop.stdout + loop.stderr


@pytest.mark.slow
def test_a_pin_that_conflicts_with_ours_fails_the_image_build(tmp_path):
    """Once: websockets==12.0 installed, then silently replaced by ours, and the build passed."""
    venv, failed = replay_image_install(tmp_path, "# a user's pin older than the connector allows\nwebsockets==12.0\n")
    assert failed is not None, "the conflicting pin was accepted"
    assert "localRequirements.txt" in failed.splitlines()[0]         # the resolving step failed
    assert "websockets==12.0" in failed and ("ResolutionImpossible" in failed or "conflict" in failed), failed
    assert not (venv / "bin" / "pyexec-connector").exists()


# ---- Kubernetes ----------------------------------------------------------------------------------

def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                found[doc["kind"]] = doc
    return found


def test_kubernetes_deployment():
    docs = manifests()
    assert {"Secret", "ConfigMap", "Deployment"} <= set(docs)
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert ports.get(http["port"], http["port"]) == 9090
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(ref["secretRef"]["name"] == docs["Secret"]["metadata"]["name"] for ref in container["envFrom"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert mounts[config_volume] == "/home/connector/serverConfig"


def test_kubernetes_configuration_is_valid_and_consistent(tmp_path):
    docs = manifests()
    secret = docs["Secret"]["stringData"]
    assert secret["CONNECTOR_AUTH_TOKEN"]
    assert secret["CONNECTOR_RECONNECT_SECRET"].strip()          # fixed: a restarted pod takes over
    data = docs["ConfigMap"]["data"]
    (tmp_path / "server.config").write_text(data["server.config"])
    properties = read_properties(tmp_path / "server.config")
    assert "authToken" not in properties                       # the token lives in the Secret only
    with pytest.raises(ConfigError, match="authToken': is a placeholder"):      # until the Secret gets a token
        build_server_config(properties, env=secret)
    config = build_server_config(properties, env={**secret, "CONNECTOR_AUTH_TOKEN": "a-real-token-123"})
    assert config.reconnect_secret == secret["CONNECTOR_RECONNECT_SECRET"]
    assert config.metrics_port == 9090
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace_seconds
    (tmp_path / "logger.ini").write_text(data["logger.ini"])
    root, ours = logging.getLogger(), logging.getLogger("pyexec_connector")
    saved = root.handlers[:], root.level, ours.level
    try:
        logging.config.fileConfig(tmp_path / "logger.ini", disable_existing_loggers=False)
        assert type(root.handlers[0].formatter).__name__ == "JsonFormatter"
    finally:
        root.handlers[:], root.level, ours.level = saved


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert all(Path(K8S / name).is_file() for name in listed)


def test_hardened_kubernetes_variant_runs_workers_as_the_images_worker_user():
    """deploy/kubernetes/hardened: the base plus a patch. The connector starts as root with only the
    capabilities that switching and signalling users needs; workers run as the image's worker user; the
    token stays in the Secret (the ConfigMap, readable by the workers, holds none)."""
    overlay = K8S / "hardened"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    (patch_ref,) = kustomization["patches"]
    patch = yaml.safe_load((overlay / patch_ref["path"]).read_text())
    base = manifests()["Deployment"]
    assert patch["kind"] == "Deployment" and patch["metadata"]["name"] == base["metadata"]["name"]
    pod = patch["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0 and pod["securityContext"]["runAsNonRoot"] is False
    (container,) = pod["containers"]
    assert container["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"]
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and sorted(caps["add"]) == ["KILL", "SETGID", "SETUID"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    worker = env["CONNECTOR_WORKER_USER"]
    created = [c.value[0] for c in first("RUN") if "useradd" in c.value[0] and f"--uid {worker}" in c.value[0]]
    assert created, f"the image has no user {worker}"
    assert worker not in ("0", "10001")             # neither root nor the connector's own user
    data = manifests()["ConfigMap"]["data"]["server.config"]
    assert "authToken" not in data


# ---- Pod Security ---------------------------------------------------------------------------------

# The controls of the Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards),
# as fields of a pod spec. Baseline lets a container add these capabilities; restricted only the last.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def pod_security_violations(pod: dict) -> dict[str, str]:
    """{control: what breaks it} for the restricted profile (a control of baseline too is marked so)."""
    found: dict[str, str] = {}
    pod_context = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found["baseline: host namespaces"] = f"{key} is true"
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found["baseline: hostPath volumes"] = volume["name"]
        if not kinds <= RESTRICTED_VOLUMES:
            found["volume types"] = f"{volume['name']}: {sorted(kinds)}"
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found["baseline: sysctls"] = sysctl["name"]
    if (pod_context.get("seccompProfile") or {}).get("type") == "Unconfined":
        found["baseline: seccomp"] = "pod: Unconfined"
    for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
        where = f"container {container['name']}"
        context = container.get("securityContext") or {}

        def effective(key: str, context=context) -> object:
            return context[key] if key in context else pod_context.get(key)

        if context.get("privileged"):
            found["baseline: privileged"] = where
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            found["baseline: hostProcess"] = where
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found["baseline: hostPorts"] = where
        if context.get("procMount", "Default") != "Default":
            found["baseline: /proc mount type"] = where
        capabilities = context.get("capabilities") or {}
        added = set(capabilities.get("add") or [])
        if not added <= BASELINE_CAPABILITIES:
            found["baseline: capabilities"] = f"{where} adds {sorted(added - BASELINE_CAPABILITIES)}"
        if not added <= RESTRICTED_CAPABILITIES:
            found["capabilities: add"] = f"{where} adds {sorted(added - RESTRICTED_CAPABILITIES)}"
        if "ALL" not in (capabilities.get("drop") or []):
            found["capabilities: drop ALL"] = where
        if context.get("allowPrivilegeEscalation") is not False:
            found["privilege escalation"] = f"{where}: allowPrivilegeEscalation is not false"
        if effective("runAsNonRoot") is not True:
            found["running as non-root"] = f"{where}: runAsNonRoot is not true"
        if effective("runAsUser") == 0:
            found["running as non-root user"] = f"{where}: runAsUser 0"
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found["seccomp"] = f"{where}: seccompProfile {seccomp}"
    return found


def strategic_merge(base: object, patch: object) -> object:
    """kustomize's strategic merge, as far as the hardened patch needs it: maps merge, lists of named
    objects (containers, env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                  for i in base + patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


def hardened_deployment() -> dict:
    overlay = K8S / "hardened"
    (patch_ref,) = yaml.safe_load((overlay / "kustomization.yaml").read_text())["patches"]
    return strategic_merge(manifests()["Deployment"], yaml.safe_load((overlay / patch_ref["path"]).read_text()))


def test_kubernetes_pod_meets_the_restricted_pod_security_profile():
    """A namespace enforcing Pod Security "restricted" admits the default variant; user code cannot read a
    service-account token because none is mounted."""
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod_security_violations(pod) == {}
    assert pod["securityContext"]["runAsUser"] == 10001          # the image's connector user (non-root)
    assert first("USER")[-1].value[0] == "connector"
    assert any("--uid 10001" in c.value[0] and "connector" in c.value[0] for c in first("RUN"))


def test_hardened_pod_breaks_only_the_restricted_controls_its_design_needs():
    """Root with SETUID, SETGID and KILL is how workers run as another user: that is baseline, not
    restricted; every other restricted control holds."""
    pod = hardened_deployment()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    violations = pod_security_violations(pod)
    assert set(violations) == {"capabilities: add", "running as non-root", "running as non-root user"}, violations
    assert "SETUID" in violations["capabilities: add"]


def test_pod_security_check_finds_what_the_manifests_once_lacked():
    """Without seccompProfile and with the token mounted, as before: the check above must see it."""
    pod = json.loads(json.dumps(manifests()["Deployment"]["spec"]["template"]["spec"]))
    del pod["securityContext"]["seccompProfile"], pod["containers"][0]["securityContext"]["seccompProfile"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert set(pod_security_violations(pod)) == {"seccomp", "privilege escalation", "baseline: hostPath volumes",
                                                 "volume types"}


@pytest.mark.parametrize("variant", ["base", "hardened"])
def test_kubernetes_manifests_validate_against_the_api_schemas(variant):
    """kubernetes-validate (PyPI): the manifests against the Kubernetes API's JSON schemas, strict (an
    unknown or misplaced field fails). The hardened variant as kustomize renders it."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    docs = dict(manifests())
    if variant == "hardened":
        docs["Deployment"] = hardened_deployment()
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)         # raises ValidationError
    broken = json.loads(json.dumps(docs["Deployment"]))
    broken["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] = "RuntimeDefault"   # not an object
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
