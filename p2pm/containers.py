"""Runs across containers: ``p2pm run SCENARIO --launch podman``, and the product image it needs.

- **image**: built from this source tree with ``deploy/Containerfile`` and reused while the sources
  are unchanged (tag ``localhost/p2pm:<hash of the sources>``); its Python packages come from a
  wheelhouse (``build/wheelhouse``, ``make wheelhouse``), so that no package index is needed inside
  the build. The base image is ``P2PM_BASE_IMAGE`` (default ``python:3.11-slim``; ``make base-image``
  makes ``localhost/debian-py:bookworm`` without a registry).
- **run**: one podman network and one container per role (coordinator, DSO, TSO, one per peer host
  of ``--peers-per-process`` peers), labelled with the run id. The coordinator, DSO and TSO see only
  the public scenario; each peer container has only its own peers' private files mounted. Progress
  and failures are reported as in a local run (``p2pm.launcher``); the coordinator's results folder
  is copied back; every container and the network are removed at the end, on error and on Ctrl-C.

podman is used through its command line; the environment's configuration applies (``CONTAINERS_CONF``).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from p2pm.launcher import (Launch, LaunchError, Role, _peer_groups, _Progress, _reader, host_id as host_name, interruptible,
                           supervise)

IMAGE_REPO = "localhost/p2pm"
DEFAULT_BASE = "python:3.11-slim"
LOCAL_BASE = "localhost/debian-py:bookworm"
PACKAGES = ("common", "peer_node", "coordinator", "dso_service", "tso_service", "p2pm")
UID = 10001  # the image's user (deploy/Containerfile)
PORT = 5555

# a configuration this kind of host needs (cgroups in hybrid mode, rlimits that cannot be raised)
CONTAINERS_CONF = """[containers]
default_ulimits = []
pids_limit = 0
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


def podman(*args: str, check: bool = True, timeout: float | None = 300, capture: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["podman", *args], capture_output=capture, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError("podman is not installed (Debian: apt-get install podman runc uidmap slirp4netns)") from None
    if check and proc.returncode != 0:
        raise LaunchError(f"podman {' '.join(args[:3])} ... failed (exit {proc.returncode}): "
                          f"{(proc.stderr or '').strip()[-2000:]}")
    return proc


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


# ------------------------------------------------------------------------------------------- image

def source_root() -> Path | None:
    """The source tree this package runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "deploy" / "Containerfile").is_file() else None


def _hash(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def source_files(root: Path) -> list[Path]:
    files = [root / "pyproject.toml", root / "README.md", root / "deploy" / "Containerfile"]
    for pkg in PACKAGES:
        files += [p for p in (root / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo")]
    return files


def hashes(root: Path) -> tuple[str, str]:
    """(dependencies hash: the project's dependencies and Python, source hash: everything that goes
    into the image)."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lock = root / "requirements.lock"
    deps = json.dumps([project.get("requires-python"), sorted(project.get("dependencies", [])),
                       lock.read_text() if lock.is_file() else ""])
    return hashlib.sha256(deps.encode()).hexdigest()[:12], _hash(source_files(root), root)


def build_wheelhouse(root: Path, wheelhouse: Path | None = None, log=print) -> Path:
    """``pip wheel``: p2pm and every dependency as wheels in ``build/wheelhouse``. The dependencies
    are fetched once per set of declared dependencies (a marker file); afterwards only p2pm's wheel
    is rebuilt."""
    wheelhouse = wheelhouse or root / "build" / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for old in wheelhouse.glob("p2pm-*.whl"):
        old.unlink()
    deps = hashes(root)[0]
    marker = wheelhouse / f".dependencies-{deps}"
    only_p2pm = ["--no-deps"] if marker.exists() else []
    log(f"wheelhouse: pip wheel {root} -> {wheelhouse}{' (p2pm only)' if only_p2pm else ''}")
    lock = root / "requirements.lock"  # the versions the lock file names, as for make install
    constraints = ["-c", str(lock)] if lock.is_file() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", *only_p2pm, *constraints,
                           "--find-links", str(wheelhouse),
                           "--wheel-dir", str(wheelhouse), str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"pip wheel failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    for stale in wheelhouse.glob(".dependencies-*"):
        stale.unlink()
    marker.touch()
    return wheelhouse


def ensure_image(image: str | None = None, base: str | None = None, log=print) -> str:
    """The image to run: ``image`` if given (it must exist), else the one of this source tree, built
    when missing (``localhost/p2pm:<source hash>``, also tagged ``localhost/p2pm:latest``)."""
    if image:
        if not image_exists(image):
            raise LaunchError(f"--image {image}: no such image in podman's storage (build one: make image)")
        return image
    root = source_root()
    if root is None:
        raise LaunchError("--launch podman: p2pm runs from an installed package, not a source tree: "
                          "give the image to run with --image (built from deploy/Containerfile)")
    deps, src = hashes(root)
    tag = f"{IMAGE_REPO}:{src}"
    if image_exists(tag):
        return tag
    base = base or os.environ.get("P2PM_BASE_IMAGE") or DEFAULT_BASE
    build_wheelhouse(root, log=log)
    log(f"image {tag}: podman build from {base}")
    t = time.monotonic()
    podman("build", "--quiet", "--build-arg", f"BASE={base}", "--build-arg", f"DEPS_HASH={deps}",
           "--build-arg", f"SOURCE_HASH={src}", "-t", tag, "-t", f"{IMAGE_REPO}:latest",
           "-f", str(root / "deploy" / "Containerfile"), str(root), timeout=1800)
    log(f"image {tag}: built in {time.monotonic() - t:.0f} s")
    # the images of earlier sources go (an image still in use by a container stays)
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO, check=False).stdout.split()
    old = [t for t in listed if t not in (tag, f"{IMAGE_REPO}:latest") and t.startswith(IMAGE_REPO + ":")]
    if old:
        podman("rmi", *old, check=False)
    return tag


# --------------------------------------------------------------------------------------------- run

def _give_to_image_user(paths: list[Path]) -> None:
    """Bind mounts keep the host's owner and mode: the private files (0600) go to the image's user."""
    if os.geteuid() == 0:
        for p in paths:
            os.chown(p, UID, UID)
    else:  # rootless podman: the image's uid maps into this user's subordinate ids
        podman("unshare", "chown", f"{UID}:{UID}", *map(str, paths))


def cleanup(run_label: str, network: str | None = None, names: list[str] = ()) -> None:
    """Remove every container of the run (by name and by label) and its network."""
    ids = podman("ps", "-aq", "--filter", f"label=p2pm.run={run_label}", check=False).stdout.split()
    if ids or names:
        podman("rm", "-f", "--ignore", "-t", "0", *names, *ids, check=False, timeout=120)
    if network:
        podman("network", "rm", "-f", network, check=False, timeout=60)


def run_podman(scenario, out: Path, *, topology: str = "relay", peers_per_process: int = 1, timeout_s: float = 30.0,
               t0: float | None = None, quiet: bool = False, report: bool = True, image: str | None = None,
               security: bool = True, keys: Path | None = None) -> dict:
    """Run the distributed clearing of ``scenario`` with one podman container per role; returns the
    summary dict (as ``p2pm.launcher.run_distributed``). CURVE as there: each container mounts only
    its own role's key folder (throwaway keys, unless ``keys``), or none with ``security=False``."""
    from p2pm.launcher import run_keys

    with run_keys(scenario, peers_per_process, security, keys) as key_dir:
        return _run_podman(scenario, out, topology=topology, peers_per_process=peers_per_process, timeout_s=timeout_s,
                           t0=t0, quiet=quiet, report=report, image=image, keys=key_dir)


def _key_mount(keys: Path | None, role: str) -> tuple[list[str], dict]:
    """A role's key folder as its own read-only mount (or --insecure): (mounts, environment)."""
    if keys is None:
        return [], {"P2PM_INSECURE": "1"}
    return [f"{keys / role}:/p2pm/keys:ro"], {"P2PM_KEYS": "/p2pm/keys"}


def _run_podman(scenario, out: Path, *, topology: str, peers_per_process: int, timeout_s: float, t0: float | None,
                quiet: bool, report: bool, image: str | None, keys: Path | None) -> dict:
    from common.public import write_split

    out = Path(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress_log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    image = ensure_image(image, log=progress_log)
    if t0 is None or time.time() - t0 > 5:  # the run's wall time starts at the launch, not with an image build
        t0 = time.time()
    run_id = uuid.uuid4().hex[:12]
    prefix = f"p2pm-{run_id}"
    network = prefix
    inputs = Path(tempfile.mkdtemp(prefix="p2pm-inputs-"))  # 0700
    launch = Launch()
    names: list[str] = []
    events: queue.Queue = queue.Queue()
    progress = _Progress(quiet)
    with interruptible() as stop:
        try:
            public_path, private = write_split(scenario, inputs / "split")
            public_dir = inputs / "public"
            public_dir.mkdir()
            shutil.move(str(public_path), public_dir / "public.json")
            (public_dir / "public.json").chmod(0o644)
            public_dir.chmod(0o755)
            groups = _peer_groups(scenario, private, peers_per_process)
            host_dirs = []
            for i, group in enumerate(groups):
                d = inputs / f"host{i}"
                d.mkdir(mode=0o700)
                for pid, path in group:
                    shutil.move(str(path), d / f"{pid}.json")
                host_dirs.append(d)
            key_dirs = [d for d in keys.iterdir() if d.is_dir()] if keys is not None else []
            _give_to_image_user([d for d in host_dirs] + [f for d in host_dirs for f in d.iterdir()]
                                + key_dirs + [f for d in key_dirs for f in d.iterdir()])
            podman("network", "create", "--label", f"p2pm.run={run_id}", network, timeout=60)
            progress_log(f"run {run_id}: containers {prefix}-* on network {network}, image {image}")

            coordinator = f"tcp://{prefix}-coordinator:{PORT}"
            n_processes = len(groups) + 3

            def start(role: Role, cname: str, args: list[str], mounts: list[str], env: dict, stdout=None,
                      keep: bool = False) -> None:
                cmd = ["podman", "run", "--name", cname, "--network", network, "--init", "--label",
                       f"p2pm.run={run_id}", "--label", f"p2pm.role={role.name}", "--hostname", cname,
                       *(["--rm"] if not keep else []), "--pull", "never"]
                for m in mounts:
                    cmd += ["-v", m]
                for k, v in env.items():
                    cmd += ["-e", f"{k}={v}"]
                cmd += [image, "/opt/p2pm/venv/bin/p2pm", *args]
                names.append(cname)
                with open(role.log, "ab") as logf:
                    role.popen = subprocess.Popen(cmd, stdout=stdout or logf, stderr=logf, stdin=subprocess.DEVNULL,
                                                  start_new_session=True)
                role.container = cname
                launch.roles.append(role)

            public_mount = f"{public_dir}:/p2pm/public:ro"
            coord = Role("coordinator", logs / "coordinator.log")
            key_mounts, key_env = _key_mount(keys, "coordinator")
            start(coord, f"{prefix}-coordinator",
                  ["coordinator", "--run-id", run_id, "--t0", repr(t0), "--processes", str(n_processes),
                   "--checkpoint-s", "0", "--no-record-command",  # (p2pm resume restarts local runs)
                   *([] if report else ["--no-report"])], [public_mount, *key_mounts],
                  {"P2PM_SCENARIO": "/p2pm/public/public.json", "P2PM_BIND": f"tcp://0.0.0.0:{PORT}",
                   "P2PM_TOPOLOGY": topology, "P2PM_OUT": "/results", "P2PM_TIMEOUT_S": f"{timeout_s:g}", **key_env},
                  stdout=subprocess.PIPE, keep=True)
            threading.Thread(target=_reader, args=("coordinator", coord.popen.stdout, events), daemon=True).start()
            for svc in ("dso", "tso"):
                key_mounts, key_env = _key_mount(keys, svc)
                start(Role(svc, logs / f"{svc}.log"), f"{prefix}-{svc}", [svc], [public_mount, *key_mounts],
                      {"P2PM_SCENARIO": "/p2pm/public/public.json", "P2PM_COORDINATOR": coordinator,
                       "P2PM_TIMEOUT_S": f"{timeout_s:g}", **key_env})
            for i, (group, d) in enumerate(zip(groups, host_dirs)):
                name = f"peer {group[0][0]}" if len(group) == 1 else f"peers {group[0][0]}..{group[-1][0]}"
                host_id = host_name(i, group)
                cname = f"{prefix}-peers-{i}"
                key_mounts, key_env = _key_mount(keys, host_id)
                env = {"P2PM_COORDINATOR": coordinator, "P2PM_HOST_ID": host_id, "P2PM_TIMEOUT_S": f"{timeout_s:g}",
                       **key_env}
                if topology == "mesh":
                    env.update(P2PM_BIND_HOST="0.0.0.0", P2PM_ADVERTISE_HOST=cname)
                args = ["peer"]
                for pid, _ in group:
                    args += ["--model", f"/p2pm/private/{pid}.json"]
                start(Role(name, logs / f"{host_id}.log", is_peer=True), cname, args,
                      [f"{d}:/p2pm/private:ro", *key_mounts], env)

            supervise(launch, coord, events, progress, stop, timeout_s, what="containers")
            podman("cp", f"{prefix}-coordinator:/results/.", str(out), timeout=120)
        finally:
            progress.close()
            # the podman clients first (SIGTERM reaches the role through the container's init), so that
            # none is still creating its container; then whatever is left, and the network
            launch.stop_all(events, grace_s=2.0)
            cleanup(run_id, network, names)
            shutil.rmtree(inputs, ignore_errors=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(launch="podman", image=image)
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary
