#!/usr/bin/env bash
# hardened-image-check.sh: run an image built from this Dockerfile (by ../shared/tools/image-check.sh, or
# `podman build -t $IMAGE .`) as the hardened variant — root with every capability dropped except SETUID,
# SETGID and KILL, no-new-privileges, CONNECTOR_WORKER_USER=10002, the token in CONNECTOR_AUTH_TOKEN — and
# probe the token vectors from user code inside the container, against the project's stand-in Vantiq
# server started in the same container. Prints PASS/FAIL per check; exit 0 only when all pass.
# Run as root from the project's root. Environment: IMAGE (default localhost/pyexec-connector:check).
set -euo pipefail
IMAGE=${IMAGE:-localhost/pyexec-connector:check}
TOKEN=hardened-check-tok-$RANDOM$RANDOM$RANDOM
NAME=pyexec-hardened-check-$$
TMP=$(mktemp -d /tmp/pyexec-hardened.XXXXXX)
PASSED=0 FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "PASS $1${2:+ ($2)}"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $1${2:+ ($2)}"; }
cleanup() { podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; rm -rf "$TMP"; }
trap cleanup EXIT

chmod 755 "$TMP"; mkdir -m 755 "$TMP/serverConfig"
printf 'targetServer = http://127.0.0.1:18080\nsources = pythonSource\n' >"$TMP/serverConfig/server.config"
chmod 644 "$TMP/serverConfig/server.config"
cat >"$TMP/driver.py" <<'EOF'
import asyncio, json, os, sys
from pyexec_connector.devserver import DevServer
CODE = r'''
import gc, os
def attempt(f):
    try:
        v = f()
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
def _parent_of(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
parent = os.getppid()       # the zygote a worker was forked from, or the connector for a spawned one
ppid = parent               # the connector: above the zygote
while open(f"/proc/{ppid}/comm").read().strip() in ("pyexec-zygote", "pyexec-worker"):
    ppid = _parent_of(ppid)
ids = [os.getuid(), os.getgid(), os.getgroups()]
environment = dict(os.environ)
parent_environ = attempt(lambda: open(f"/proc/{ppid}/environ", "rb").read())
parent_mem = attempt(lambda: open(f"/proc/{ppid}/mem", "rb").read(1))
every_environ = {p: attempt(lambda: open(f"/proc/{p}/environ", "rb").read()) for p in os.listdir("/proc") if p.isdigit()}
config = attempt(lambda: open("serverConfig/server.config").read())
signal_connector = attempt(lambda: os.kill(ppid, 0))
server_config = connector_connection.get_server_config()
connection = repr(vars(connector_connection))
strings = [repr(x)[:100] for x in gc.get_objects() if isinstance(x, dict) for x in x.values() if isinstance(x, str) and "hardened-check-" in x and x != "hardened-check-"]
'''
async def main():
    token = sys.argv[1]
    server = DevServer(token=token, sources=("pythonSource",))
    server.set_source_config("pythonSource", {"workers": 1, "maxProcessesPerWorker": 40})
    await server.start(port=18080)
    await server.wait_attached("pythonSource", timeout=60)
    reply = await server.query({"code": CODE}, "pythonSource", timeout=60)
    print("RESULT", json.dumps({"status": reply.status, "body": reply.body}), flush=True)
    bomb = await server.query({"code": "import os, time\nfor _ in range(300):\n    if os.fork() == 0:\n"
                                       "        time.sleep(2); os._exit(0)\n"}, "pythonSource", timeout=60)
    print("BOMB", json.dumps({"status": bomb.status, "body": bomb.body}), flush=True)
    after = await server.query({"code": "x = 1"}, "pythonSource", timeout=60)
    print("AFTER", after.status, flush=True)
    await server.stop()
asyncio.run(main())
EOF

podman run -d --no-healthcheck --name "$NAME" --user 0 --cap-drop ALL --cap-add SETUID,SETGID,KILL \
  --security-opt no-new-privileges -e CONNECTOR_AUTH_TOKEN="$TOKEN" -e CONNECTOR_WORKER_USER=10002 \
  -v "$TMP/serverConfig:/home/connector/serverConfig:ro" "$IMAGE" >/dev/null
sleep 1
timeout 180 podman exec -i "$NAME" python3 - "$TOKEN" <"$TMP/driver.py" >"$TMP/out" 2>&1 || true
podman logs "$NAME" >"$TMP/logs" 2>&1 || true
caps=$(podman exec "$NAME" sh -c 'grep CapEff /proc/1/status; for p in /proc/[0-9]*; do
  [ "$(cat $p/comm 2>/dev/null)" = pyexec-connecto ] && grep CapEff $p/status; done' 2>&1 || true)
echo "capabilities in the container: $(tr '\n' ' ' <<<"$caps")"

result=$(sed -n 's/^RESULT //p' "$TMP/out")
if [[ -z $result ]]; then fail vectors "no reply"; sed 's/^/    | /' "$TMP/out" "$TMP/logs" | tail -40
else
  python3 - "$TOKEN" "$result" <<'EOF' && pass vectors "uid 10002, no token by any vector" || fail vectors
import json, sys
token, result = sys.argv[1], json.loads(sys.argv[2])
assert result["status"] == 200, result
r = result["body"]["pythonCallResults"]
problems = []
if r["ids"] != [10002, 10002, []]: problems.append(f"ids {r['ids']}")
for k in ("parent_environ", "parent_mem", "signal_connector"):
    if not r[k].startswith("PermissionError"): problems.append(f"{k}: {r[k][:100]}")
if any(k.startswith("CONNECTOR_") for k in r["environment"]): problems.append("CONNECTOR_* in the environment")
if r["strings"]: problems.append(f"memory: {r['strings']}")
text = json.dumps(r)
for i in range(len(token) - 11):
    if token[i:i + 12] in text: problems.append(f"token slice in {text[max(0, text.find(token[i:i+12]) - 80):][:160]}"); break
for p in problems: print("   ", p)
sys.exit(1 if problems else 0)
EOF
fi
if grep -q '^BOMB {"status": 400.*maxProcessesPerWorker = 40' "$TMP/out"; then pass fork-bomb-answered "$(sed -n 's/^BOMB //p' "$TMP/out" | cut -c1-200)"; else fail fork-bomb-answered; fi
if grep -q '^AFTER 200' "$TMP/out"; then pass next-query-served; else fail next-query-served; fi
if grep -q "$TOKEN" "$TMP/logs"; then fail logs "the token is in the container's log"; else pass logs "no token in the log"; fi
echo "hardened-image-check: $PASSED passed, $FAILED failed"
((FAILED == 0))
