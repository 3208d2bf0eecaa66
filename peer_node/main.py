"""A peer process: the peer engine for one or several peers in the socket shell. It reads only the
hosted peers' own private model files; light by design (numpy, pyzmq, msgpack; no cvxpy, no
pandapower, no pandas)."""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from pathlib import Path

from common.models import peer_model_from_dict
from common.logs import setup_logging
from common.shell import Shell, ShellFailure


def load_models(model_files: list[str]) -> list:
    """The hosted peers' private models, one JSON file each (``p2pm scenarios split`` writes them)."""
    if not model_files:
        raise ValueError("no peer to host: give --model FILE (one private model file per hosted peer)")
    return [peer_model_from_dict(json.loads(_private_bytes(Path(f)))) for f in model_files]


def _private_bytes(path: Path) -> bytes:
    """A private file's JSON; also accepted base64-encoded, as some container engines (podman 4.3's
    ``kube play``) write a Kubernetes Secret's data into its volume without decoding it."""
    raw = path.read_bytes()
    if raw.lstrip()[:1] not in (b"{", b""):
        import base64
        import binascii

        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return raw  # not base64 either: let the JSON parser name the problem
    return raw


def main(models: list, coordinator: str, host_id: str | None, timeout_s: float, bind_host: str = "127.0.0.1",
         advertise_host: str | None = None, curve=None, heartbeat_s: float = 1.0) -> int:
    """Serve the hosted peers until the coordinator's SHUTDOWN (0) or a failure (1). Under policy
    wait (the coordinator's WELCOME says ``rejoin``), a host that lost its coordinator (it was
    stopped, or cut off, for longer than the coordinator's liveness window) registers once more as
    a new host process would; if the coordinator does not welcome it back within 5 heartbeat
    intervals, it stops."""
    from common.engine import COORDINATOR
    from peer_node.engine import PeerEngine

    host_id = host_id or (curve.role if curve is not None else f"host-{models[0].id}")
    log = setup_logging(host_id)  # a forked peer: its own role in every line, not its parent's
    names = ", ".join(m.id for m in models)
    welcome_timeout_s = None
    while True:
        engine = PeerEngine(models, host_id, pid=os.getpid(), host=socket.gethostname())
        # the peer waits for the coordinator's next round for at most twice the coordinator's deadline
        # (the coordinator's WELCOME sets the heartbeat interval; a coordinator silent for 5 of them is lost)
        shell = Shell(engine, connect=coordinator, timeout_s=2 * timeout_s + 5, mesh_host=bind_host,
                      advertise_host=advertise_host, curve=curve, heartbeat_s=heartbeat_s,
                      welcome_timeout_s=welcome_timeout_s)
        engine.address = shell.mesh_address
        log.info(f"hosting {names}; mesh socket {shell.mesh_address}")
        try:
            shell.run()
            return 0
        except ShellFailure as exc:
            again = (engine.rejoin and welcome_timeout_s is None and exc.role == COORDINATOR
                     and exc.reason.startswith("lost the coordinator"))
            if not again:
                log.error(f"peer(s) {names} stopped: {exc}")
                return 1
            log.warning(f"peer(s) {names}: {exc}; registering again (policy wait)")
            welcome_timeout_s = shell.liveness_misses * shell.heartbeat_s
        finally:
            if engine.rejected:
                log.warning(f"rejected messages: {engine.rejected}")
            shell.close()


def child_main(model_files: list[str], coordinator: str, host_id: str, timeout_s: float, log_path: str,
               keys: str | None = None, heartbeat_s: float = 1.0) -> None:
    """Entry point of a peer process forked by ``peer_node.zygote``: logs to ``log_path``; ``keys``:
    its own key folder (None: without CURVE). An exception is written to the log with its traceback
    before the process ends."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        curve = None
        if keys is not None:
            from common.security import load_identity

            curve = load_identity(keys)
        code = main(load_models(model_files), coordinator, host_id, timeout_s, curve=curve, heartbeat_s=heartbeat_s)
    except BaseException:  # noqa: BLE001 - the reason must reach the log before os._exit
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
