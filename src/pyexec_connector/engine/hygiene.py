"""The console command's side of process hygiene (docs/PROCESSES.md): at start, the connector's cgroup
where one can be had, and one log line saying which guarantee holds; at exit, the cgroup killed."""
from __future__ import annotations

import logging

from . import cgroup

log = logging.getLogger("pyexec_connector.processes")


def start() -> bool:
    """Open the connector's cgroup and say once what ends the processes started under the connector.
    True when the cgroup holds them."""
    opened, why = cgroup.open_for_connector()
    if opened is not None:
        log.info("process hygiene: zygotes and workers run in the cgroup %s; whatever they start ends with "
                 "its query (unless keepChildProcesses), its worker, and the connector, also if the connector "
                 "is killed", opened.path)
        return True
    log.info("process hygiene without a cgroup of the connector's own (%s): whatever workers start ends with "
             "its query (unless keepChildProcesses), its worker and the connector's shutdown; if the connector "
             "is killed, each zygote ends what is under it (a worker spawned without a zygote ends by its "
             "parent-death signal, what it started in a session of its own may stay)", why)
    return False


def stop() -> None:
    """The connector is exiting: kill what is still in its cgroup (nothing, after an orderly shutdown)."""
    cgroup.close()
