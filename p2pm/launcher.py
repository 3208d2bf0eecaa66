"""Local launcher: starts every role of a run as its own OS process on loopback, shows progress,
and stops all of them at the end, on error and on Ctrl-C.

- the scenario is split first (``common.public``): the public part for the coordinator, the DSO and
  the TSO, one private file per peer in a folder only this user can read, removed after the run;
- coordinator, DSO and TSO services: ``python -m <role>`` subprocesses with the public file, each
  with its own log;
- CURVE (``common.security``, on unless ``security=False``): a throwaway key pair per role, made
  for the run in a folder only this user can read and removed after the run (or the key folder of
  ``p2pm keys``); each role is given only its own key folder;
- peer processes: forked by a clean fork server (``peer_node.zygote``) that has imported only the
  peer code (no scenario, no solver), so that dozens of them start in well under a second; each
  gets the paths of its own peers' private files only. ``p2pm peer`` starts the same peer process by
  hand elsewhere.

A role that exits with an error ends the run: the others are stopped and the error names the role,
its exit code and the tail of its log.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common.process import die_with_parent, role_environment
from common.public import write_split


class LaunchError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + t for t in text[-lines:]) or "    (empty log)"


@dataclass
class Role:
    """A process of the run: a direct child (``popen``) or a peer forked by the zygote (``forked_pid``,
    whose exit the zygote reports)."""

    name: str
    log: Path
    popen: subprocess.Popen | None = None
    forked_pid: int | None = None
    exitcode: int | None = None
    peak_rss_kib: int | None = None
    cpu_s: float | None = None  # user + system CPU time of the process, from the OS accounting at its exit
    is_peer: bool = False
    container: str | None = None  # --launch podman: the role's container (popen is its ``podman run``)

    def describe(self) -> str:
        if self.container:
            return f"{self.name} (container {self.container})"
        return f"{self.name} (host {self.log.stem}, pid {self.pid})" if self.is_peer else f"{self.name} (pid {self.pid})"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else self.forked_pid

    def poll(self) -> int | None:
        if self.exitcode is not None:
            return self.exitcode
        if self.popen is not None:
            pid, status, rusage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
                self.popen.returncode = self.exitcode
                self.peak_rss_kib = rusage.ru_maxrss
                self.cpu_s = rusage.ru_utime + rusage.ru_stime
        return self.exitcode

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.poll() is None and self.pid is not None:
            try:
                os.kill(self.pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(self.pid, signal.SIGCONT)  # a stopped process handles its SIGTERM too
            except ProcessLookupError:
                pass


@dataclass
class Launch:
    roles: list[Role] = field(default_factory=list)

    def stop_all(self, events: "queue.Queue | None" = None, grace_s: float = 3.0) -> None:
        # the fork server goes last: it reports its peers' exits, so that none is waited for in vain
        # (and no reused process id is signalled)
        servers = [r for r in self.roles if r.name == "peer fork server"]
        others = [r for r in self.roles if r.name != "peer fork server"]
        for group in (others, servers):
            for r in group:
                r.stop(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(r.poll() is None for r in group):
                if events is not None:
                    self.absorb(events)
                time.sleep(0.01)
            for r in group:
                if r.poll() is None:
                    r.stop(signal.SIGKILL)
        if events is not None:
            end = time.monotonic() + 2
            while time.monotonic() < end and any(r.poll() is None for r in self.roles if r.is_peer):
                self.absorb(events)
                time.sleep(0.02)
        for r in self.roles:
            if r.popen is not None and r.exitcode is None:
                try:
                    _, status, rusage = os.wait4(r.popen.pid, 0)
                    r.cpu_s = rusage.ru_utime + rusage.ru_stime
                    r.exitcode = os.waitstatus_to_exitcode(status)
                    r.popen.returncode = r.exitcode
                except ChildProcessError:
                    pass
            if r.popen is not None:
                for stream in (r.popen.stdout, r.popen.stdin):
                    if stream is not None:
                        stream.close()

    def absorb(self, events: "queue.Queue") -> list[dict]:
        """Apply the zygote's reports (peer started / exited); return the coordinator's events."""
        out = []
        while True:
            try:
                source, line = events.get_nowait()
            except queue.Empty:
                return out
            if line is None:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if source == "coordinator":
                out.append(ev)
                continue
            if ev.get("event") == "started":
                for r in self.roles:
                    if r.is_peer and r.log.stem == ev["host_id"]:
                        r.forked_pid = ev["pid"]
            elif ev.get("event") == "exit":
                for r in self.roles:
                    if r.is_peer and r.forked_pid == ev["pid"]:
                        r.exitcode = ev["code"]
                        r.peak_rss_kib = ev["peak_rss_kib"]
                        r.cpu_s = ev.get("cpu_s")


def _spawn(module: str, args: list[str], log: Path, stdout=None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """``python -m <module> <args>`` as a child that dies with the launcher, logging to ``log``."""
    logf = open(log, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=stdout or logf, stderr=logf,
                                stdin=stdin, start_new_session=True, preexec_fn=die_with_parent,
                                env=role_environment())
    finally:
        logf.close()


def _peer_groups(scenario, private_files: dict[str, Path], per_process: int) -> list[list[tuple[str, Path]]]:
    """Each peer process's (peer id, private file). In the community market the external supplier
    is not a peer: the root exchange belongs to the network agent (DSO)."""
    ids = [p.id for p in scenario.peers if not (scenario.market.kind == "community" and p.kind == "grid")]
    files = [(pid, private_files[pid]) for pid in ids]
    return [files[i:i + per_process] for i in range(0, len(files), per_process)]


def host_id(index: int, group: list) -> str:
    """A peer host's name (its routing identity and its role in the key roster): ``h0000-<first peer>``."""
    return f"h{index:04d}-{group[0][0]}"


def peer_hosts(scenario, peers_per_process: int) -> dict[str, list[str]]:
    """{host id: [peer ids]}, as the launcher groups them (``p2pm keys`` names hosts the same way)."""
    groups = _peer_groups(scenario, {p.id: Path() for p in scenario.peers}, peers_per_process)
    return {host_id(i, g): [pid for pid, _ in g] for i, g in enumerate(groups)}


@contextmanager
def run_keys(scenario, peers_per_process: int, security: bool = True, keys: Path | None = None):
    """The run's key folder: ``keys`` (checked against the run's roles), throwaway keys made for the
    run in a private temporary folder removed afterwards, or None without security."""
    if not security:
        yield None
        return
    from common.security import Roster, write_keys

    hosts = peer_hosts(scenario, peers_per_process)
    if keys is not None:
        roster = Roster.load(Path(keys) / "roster.json")
        missing = sorted({"coordinator", "dso", "tso", *hosts} - set(roster.keys))
        if missing:
            raise LaunchError(f"--keys: {keys}/roster.json has no key for {', '.join(missing[:5])} (make the keys with "
                              f"the same --peers-per-process)")
        yield Path(keys)
        return
    folder = Path(tempfile.mkdtemp(prefix="p2pm-keys-"))  # mode 0700
    try:
        write_keys(folder, ["coordinator", "dso", "tso", *hosts], hosts, scenario.name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _security_args(keys: Path | None, role: str) -> list[str]:
    return ["--insecure"] if keys is None else ["--keys", str(keys / role)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reader(source: str, stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        q.put((source, line.decode(errors="replace").strip()))
    q.put((source, None))


def run_distributed(scenario, out: Path, *, topology: str = "relay", peers_per_process: int = 1,
                    timeout_s: float = 30.0, t0: float | None = None, quiet: bool = False, report: bool = True,
                    on_event=None, security: bool = True, keys: Path | None = None, on_peer_loss: str = "abort",
                    heartbeat_s: float = 1.0, grace_s: float = 60.0, checkpoint_s: float = 0.0,
                    checkpoint_every: int = 0, resume: Path | None = None) -> dict:
    """Run the distributed clearing of ``scenario`` (loaded, with any overrides applied) locally;
    returns the summary dict. ``on_event``, if given, is called with every progress event of the
    coordinator (a dict: ready, iteration, outer, done). ``security``: CURVE with throwaway keys
    (or the key folder ``keys`` of ``p2pm keys``); False: without (``--insecure``).
    ``checkpoint_s``/``checkpoint_every``: the coordinator's checkpoints (``out/checkpoint``);
    ``resume``: a results folder whose checkpoint the run goes on from (its earlier logs are kept
    in ``logs-interrupted-N``)."""
    t0 = time.time() if t0 is None else t0
    from p2pm.sizing import check_message_size

    too_big = check_message_size(scenario, peers_per_process)
    if too_big:  # refused before any process starts (it would crash the coordinator at its first ROUND)
        raise LaunchError(too_big)
    out = Path(out)
    logs = out / "logs"
    if resume is not None and logs.is_dir():
        n = 1
        while (out / f"logs-interrupted-{n}").exists():
            n += 1
        logs.rename(out / f"logs-interrupted-{n}")
    logs.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    inputs = Path(tempfile.mkdtemp(prefix="p2pm-inputs-"))  # mode 0700: the peers' private files
    try:
        with run_keys(scenario, peers_per_process, security, keys) as key_dir:
            public_path, private_files = write_split(scenario, inputs)
            checkpoints = ["--checkpoint-s", repr(checkpoint_s), "--checkpoint-every", str(checkpoint_every),
                           "--no-record-command", *([] if resume is None else ["--resume", str(resume)])]
            return _run(public_path, private_files, scenario, out, logs, run_id, topology, peers_per_process,
                        timeout_s, t0, quiet, report, on_event, key_dir, on_peer_loss, heartbeat_s, grace_s,
                        checkpoints)
    finally:
        shutil.rmtree(inputs, ignore_errors=True)


def _run(public_path, private_files, scenario, out, logs, run_id, topology, peers_per_process, timeout_s, t0, quiet,
         report, on_event=None, keys: Path | None = None, on_peer_loss: str = "abort", heartbeat_s: float = 1.0,
         grace_s: float = 60.0, checkpoints: tuple[str, ...] = ()) -> dict:
    groups = _peer_groups(scenario, private_files, peers_per_process)
    n_processes = len(groups) + 3
    launch = Launch()
    events: queue.Queue = queue.Queue()
    progress = _Progress(quiet)
    with interruptible() as stop:
        try:
            # the fork server starts first: its imports overlap with the coordinator's
            zygote = Role("peer fork server", logs / "zygote.log")
            zygote.popen = _spawn("peer_node.zygote", [], zygote.log, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            launch.roles.append(zygote)
            threading.Thread(target=_reader, args=("zygote", zygote.popen.stdout, events), daemon=True).start()

            ready_file = logs / "coordinator.address"
            ready_file.unlink(missing_ok=True)
            # a free port chosen here, so that the DSO and TSO (the slowest to import) start at once and
            # connect while the coordinator is still starting (ZeroMQ retries the connection)
            address = f"tcp://127.0.0.1:{_free_port()}"
            coord = Role("coordinator", logs / "coordinator.log")
            coord.popen = _spawn("p2pm", ["coordinator",
                "--scenario", str(public_path), "--bind", address, "--ready-file", str(ready_file),
                "--run-id", run_id, "--topology", topology, "--out", str(out), "--timeout-s", str(timeout_s),
                "--t0", repr(t0), "--processes", str(n_processes), *([] if report else ["--no-report"]),
                *_security_args(keys, "coordinator"),
                "--on-peer-loss", on_peer_loss, "--heartbeat-s", repr(heartbeat_s), "--grace-s", repr(grace_s),
                *checkpoints],
                coord.log, stdout=subprocess.PIPE)
            launch.roles.append(coord)
            threading.Thread(target=_reader, args=("coordinator", coord.popen.stdout, events), daemon=True).start()

            for svc in ("dso", "tso"):
                r = Role(svc, logs / f"{svc}.log")
                r.popen = _spawn("p2pm", [svc, "--scenario", str(public_path), "--coordinator", address,
                                       "--timeout-s", str(timeout_s), *_security_args(keys, svc)], r.log)
                launch.roles.append(r)

            deadline = time.monotonic() + timeout_s
            while not ready_file.exists() or not ready_file.read_text():
                if coord.poll() is not None:
                    raise LaunchError(f"the coordinator exited with code {coord.exitcode} before listening:\n{_tail(coord.log)}")
                if time.monotonic() > deadline:
                    raise LaunchError(f"the coordinator did not start listening within {timeout_s:g} s")
                if stop.is_set():
                    raise LaunchError(f"interrupted; stopped all {len(launch.roles)} processes of the run")
                time.sleep(0.01)

            for i, group in enumerate(groups):
                name = f"peer {group[0][0]}" if len(group) == 1 else f"peers {group[0][0]}..{group[-1][0]}"
                host = host_id(i, group)
                r = Role(name, logs / f"{host}.log", is_peer=True)
                launch.roles.append(r)
                zygote.popen.stdin.write((json.dumps({"host_id": host, "model_files": [str(f) for _, f in group],
                                                      "coordinator": address, "timeout_s": timeout_s,
                                                      "log": str(r.log), "heartbeat_s": heartbeat_s,
                                                      "keys": None if keys is None else str(keys / host)})
                                          + "\n").encode())
            zygote.popen.stdin.close()
            supervise(launch, coord, events, progress, stop, timeout_s, on_event=on_event,
                      dropped_ok=on_peer_loss != "abort")
        finally:
            progress.close()
            launch.stop_all(events)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(_memory(launch))
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


@contextmanager
def interruptible():
    """Ctrl-C (and SIGTERM) set the yielded flag, which the launch loops check: an exception raised
    at an arbitrary point could leave a lock of the event queue held and hang the teardown."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    else:
        previous = {}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def supervise(launch: Launch, coord: Role, events: "queue.Queue", progress: "_Progress", stop: threading.Event,
              timeout_s: float, what: str = "processes", on_event=None, dropped_ok: bool = False) -> None:
    """Show the coordinator's progress until it has written the results, then wait for the other
    roles to end on its SHUTDOWN. LaunchError naming the role when one fails, and on Ctrl-C. With
    ``dropped_ok`` (policy drop) a peer process that ends is the coordinator's to judge, and the peer
    hosts it dropped are not waited for."""
    done = False
    dropped: set[str] = set()
    server = next((r for r in launch.roles if r.name == "peer fork server"), None)
    while True:
        if server is not None and server.poll() not in (None, 0):  # its peers die with it: it is to blame
            raise LaunchError(f"the peer fork server (pid {server.pid}) exited with code {server.exitcode}; its peer "
                              f"processes ended with it; its log ends with:\n{_tail(server.log)}")
        for ev in launch.absorb(events):
            progress.update(ev)
            if on_event is not None:
                on_event(ev)
            if ev.get("event") == "done":
                done = True
            elif ev.get("event") == "dropped":
                dropped.add(str(ev.get("host")))
            elif ev.get("event") == "failed":
                raise LaunchError(f"the coordinator stopped the run: {ev.get('reason')}{_culprit(launch, coord)}")
        if coord.poll() is not None:
            time.sleep(0.05)
            done = done or any(ev.get("event") == "done" for ev in launch.absorb(events))
            if coord.exitcode == 0 and done:
                break
            raise LaunchError(f"the coordinator exited with code {coord.exitcode}:\n{_tail(coord.log)}{_culprit(launch, coord)}")
        for r in launch.roles:
            code = r.poll()
            if (r is not coord and r.name != "peer fork server" and code not in (None, 0)
                    and not (dropped_ok and r.is_peer)):
                raise LaunchError(f"{r.describe()} exited with code {code}; its log ends with:\n{_tail(r.log)}")
        if stop.is_set():
            raise LaunchError(f"interrupted; stopped all {len(launch.roles)} {what} of the run")
        time.sleep(0.02)
    # the coordinator has written the results; the others end on its SHUTDOWN. A dropped host is
    # stopped now: it may be a stopped (SIGSTOP) process, and the fork server that forked it waits for it
    for r in launch.roles:
        if r.is_peer and r.log.stem in dropped:
            r.stop(signal.SIGTERM)
    end = time.monotonic() + timeout_s
    waited = [r for r in launch.roles if not (r.is_peer and r.log.stem in dropped)]
    while any(r.poll() is None for r in waited) and time.monotonic() < end and not stop.is_set():
        launch.absorb(events)
        time.sleep(0.02)


def _culprit(launch: Launch, coord: Role) -> str:
    """The first other role that died, with its log tail (often the root cause); the peer fork
    server first (its peers die with it)."""
    for r in sorted(launch.roles, key=lambda r: r.name != "peer fork server"):
        if r is not coord and r.name != "peer fork server" and r.poll() not in (None, 0):
            return f"\n{r.describe()} exited with code {r.exitcode}; its log ends with:\n{_tail(r.log)}"
    return ""


def _memory(launch: Launch) -> dict:
    """Peak resident memory per process (MiB), from the OS accounting of each role."""
    peers = []
    by_role = {}
    for r in launch.roles:
        kib = r.peak_rss_kib
        if kib is None or r.name == "peer fork server":
            continue
        if r.is_peer:
            peers.append(kib / 1024)
        else:
            by_role[r.name] = kib / 1024
    out = {f"peak_rss_mib_{k}": round(v, 1) for k, v in by_role.items()}
    if peers:
        out["peak_rss_mib_peer_max"] = round(max(peers), 1)
        out["peak_rss_mib_peer_median"] = round(sorted(peers)[len(peers) // 2], 1)
        out["peak_rss_mib_peers_total"] = round(sum(peers), 1)
    out["peak_rss_mib_total"] = round(sum(peers) + sum(by_role.values()), 1)
    # CPU time per process (less sensitive to a busy machine than wall times; start-up included)
    cpu = {r.name: r.cpu_s for r in launch.roles if r.cpu_s is not None and r.name != "peer fork server"}
    for role in ("coordinator", "dso", "tso"):
        if role in cpu:
            out[f"cpu_s_{role}"] = round(cpu[role], 3)
    peer_cpu = [r.cpu_s for r in launch.roles if r.is_peer and r.cpu_s is not None]
    if peer_cpu:
        out["cpu_s_peers_total"] = round(sum(peer_cpu), 3)
    if cpu:
        out["cpu_s_total"] = round(sum(cpu.values()), 3)
    return out


class _Progress:
    """Iteration and residuals while the run goes (rich status line on a terminal)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.status = None
        self.last_print = 0.0
        if not quiet and sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status("starting processes ...")
            self.status.start()

    def update(self, ev: dict) -> None:
        if self.quiet or not ev:
            return
        if ev.get("event") == "ready":
            text = f"{ev['peers']} peers in {ev['hosts']} processes ready after {ev['startup_s']:.2f} s"
        elif ev.get("event") == "iteration":
            text = (f"ADMM iteration {ev['iteration']}: primal {ev['primal']:.3e} MW, dual {ev['dual']:.3e} EUR/MWh, "
                    f"rho {ev['rho']:.3g}")
        elif ev.get("event") == "outer":
            text = (f"outer iteration {ev['outer']} ({ev['step']}): {ev['iterations']} ADMM iterations, "
                    f"{ev['violations']} violation(s) in the AC check")
        elif ev.get("event") == "done":
            text = "market cleared; AC validation done, results written"
        else:
            return
        if self.status is not None:
            self.status.update(text)
        elif time.monotonic() - self.last_print > 2.0 or ev.get("event") != "iteration":
            self.last_print = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
