"""Real containers with podman: the product image built from a local base (no registry), mv37 run
from the generated Kubernetes manifests with ``podman kube play`` and with ``p2pm run --launch
podman``, both compared with a local run; nothing is left behind after a run, after Ctrl-C and after
a peer container was killed; a peer container holds no other peer's private file.

Marked ``containers`` and ``e2e`` (deselect with ``-m "not containers"``). Skipped, with the reason,
where podman cannot run. The expensive parts are cached between runs: the base image's root file
system (``/var/cache/p2pm``, or ``P2PM_CACHE_DIR``), the dependency wheels, and the images in
podman's storage (the product image is tagged with the hash of the sources; its dependency layer is
reused while the dependencies are unchanged).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from p2pm_support import P2PM, run_cli

pytestmark = [pytest.mark.containers, pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("P2PM_CACHE_DIR", "/var/cache/p2pm"))
BASE = "localhost/debian-py:bookworm"
PPP = "10"  # mv37: 50 peers in 5 peer containers


def podman(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(map(str, args))}: {r.stderr}"
    return r


@pytest.fixture(scope="session")
def podman_ready(tmp_path_factory):
    """podman with a configuration of this test's own (CONTAINERS_CONF, inherited by every podman call)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman runc uidmap slirp4netns fuse-overlayfs; .ci/run does)")
    from p2pm.containers import CONTAINERS_CONF

    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    previous = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    probe = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"podman cannot run here: {reason}")
    yield
    if previous is None:
        os.environ.pop("CONTAINERS_CONF", None)
    else:
        os.environ["CONTAINERS_CONF"] = previous


@pytest.fixture(scope="session")
def base_image(podman_ready):
    from p2pm.containers import image_exists

    if image_exists(BASE):
        return BASE
    if not (CACHE / "debian-py-bookworm.tar").exists() and (shutil.which("debootstrap") is None or os.geteuid() != 0):
        pytest.skip(f"no base image {BASE}, and debootstrap cannot make one here (needs root and debootstrap)")
    r = subprocess.run([str(ROOT / "deploy" / "base-image.sh"), BASE, str(CACHE)], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"deploy/base-image.sh failed:\n{r.stdout}\n{r.stderr}"
    return BASE


@pytest.fixture(scope="session")
def image(base_image):
    """The product image of these sources (built once per source hash, reused afterwards). The
    dependency wheels are kept in the cache between runs."""
    from p2pm.containers import ensure_image

    wheels = CACHE / "wheelhouse"
    wheelhouse = ROOT / "build" / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    if wheels.is_dir():
        for w in wheels.glob("*.whl"):
            if not (wheelhouse / w.name).exists():
                shutil.copy2(w, wheelhouse / w.name)
    tag = ensure_image(base=base_image, log=lambda m: None)
    try:
        wheels.mkdir(parents=True, exist_ok=True)
        for w in wheelhouse.glob("*.whl"):
            if not w.name.startswith("p2pm-") and not (wheels / w.name).exists():
                shutil.copy2(w, wheels / w.name)
    except OSError:
        pass  # a cache we cannot write: only slower next time
    return tag


@pytest.fixture(scope="session")
def local_mv37(tmp_path_factory):
    """mv37 run locally (one OS process per role), peers grouped as in the container runs."""
    out = tmp_path_factory.mktemp("local") / "mv37"
    r = run_cli("run", "mv37", "--peers-per-process", PPP, "--out", out, "--quiet", "--no-report", timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    return out


def assert_same_results(run: Path, ref: Path) -> dict:
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert a["converged"] and b["converged"]
    assert abs(a["social_welfare_eur"] - b["social_welfare_eur"]) <= 1e-6 * abs(b["social_welfare_eur"])
    da, db = (pd.read_csv(d / "dispatch.csv").set_index(["peer", "hour"]).sort_index() for d in (run, ref))
    assert da.index.equals(db.index) and len(da) == 50 * 24
    assert np.max(np.abs(da["p_mw"].to_numpy() - db["p_mw"].to_numpy())) <= 1e-3
    return a


# ------------------------------------------------------------------------------- kube play helpers

def kube_down(path: Path, docs: list[dict]) -> None:
    """``podman kube down`` and what it leaves: the volumes made for the ConfigMap, the Secrets and
    the claim (podman names them after those), and the podman secrets."""
    podman("kube", "down", path, check=False)
    named = [d["metadata"]["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret", "PersistentVolumeClaim")]
    if named:
        podman("volume", "rm", "-f", *named, check=False)
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    if secrets:
        podman("secret", "rm", *secrets, check=False)


def assert_kube_gone(docs: list[dict], network: str) -> None:
    pods = {d["metadata"]["name"] for d in docs if d["kind"] == "Pod"}
    assert not pods & set(podman("pod", "ls", "--format", "{{.Name}}").stdout.split())
    names = {d["metadata"]["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret", "PersistentVolumeClaim")}
    assert not names & set(podman("volume", "ls", "--format", "{{.Name}}").stdout.split())
    assert podman("network", "exists", network, check=False).returncode != 0


def generate_kube(tmp_path: Path, image: str, *extra) -> tuple[Path, list[dict]]:
    out = tmp_path / "kube"
    r = run_cli("deploy", "kube", "mv37", "--out", out, "--image", image, "--peers-per-process", PPP,
                "--timeout-s", "60", *extra)
    assert r.returncode == 0, r.stderr + r.stdout
    return out / "kube.yaml", [d for d in yaml.safe_load_all((out / "kube.yaml").read_text()) if d]


def test_mv37_from_the_kubernetes_manifests_under_podman_kube_play(image, local_mv37, tmp_path):
    path, docs = generate_kube(tmp_path, image)
    network = f"p2pm-test-{uuid.uuid4().hex[:8]}"
    podman("network", "create", network)
    try:
        kube_down(path, docs)  # what an interrupted earlier run may have left under these names
        t = time.monotonic()
        podman("kube", "play", "--network", network, path)
        pods = set(podman("pod", "ls", "--format", "{{.Name}}").stdout.split())
        assert {"p2pm-coordinator", "p2pm-dso", "p2pm-tso", *(f"p2pm-peers-{i}" for i in range(5))} <= pods
        code = podman("wait", "p2pm-coordinator-coordinator", timeout=600).stdout.strip()
        wall = time.monotonic() - t
        assert code == "0", "\n".join(podman("logs", f"p2pm-{role}-{role}", check=False).stderr[-2000:]
                                      for role in ("coordinator", "dso", "tso"))
        results = tmp_path / "results"
        results.mkdir()
        podman("cp", "p2pm-coordinator-coordinator:/results/.", results)  # from the coordinator's volume
        summary = assert_same_results(results, local_mv37)
        assert summary["peer_processes"] == 5
        print(f"kube play mv37: {wall:.1f} s from kube play to results, welfare {summary['social_welfare_eur']:.2f} "
              f"EUR, {summary['iterations']} iterations")
        for i in range(5):  # every peer host ended on the coordinator's shutdown
            assert podman("inspect", f"p2pm-peers-{i}-peer", "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
    finally:
        kube_down(path, docs)
        podman("network", "rm", "-f", network, check=False)
    assert_kube_gone(docs, network)


def test_a_peer_pod_holds_no_other_peers_private_file(image, tmp_path):
    """Played without the DSO: the market clears, then the coordinator waits for the DSO's AC check
    (a long deadline) and the peer pods stay up to be looked into."""
    path, docs = generate_kube(tmp_path, image, "--timeout-s", "900")
    subset = [d for d in docs if d["metadata"]["name"] not in ("p2pm-dso", "p2pm-tso")]
    play = tmp_path / "peers.yaml"
    play.write_text(yaml.safe_dump_all(subset))
    own = {d["metadata"]["name"]: sorted(d["data"]) for d in subset
           if d["kind"] == "Secret" and "p2pm/host" in d["metadata"]["labels"]}
    network = f"p2pm-test-{uuid.uuid4().hex[:8]}"
    podman("network", "create", network)
    look = ("id -u; ls /p2pm/private; echo ---; for f in /p2pm/private/*; do test -r $f && echo readable $f; done; "
            "echo ---; find / \\( -path /proc -o -path /sys \\) -prune -o -name '*.json' -print 2>/dev/null; echo ---; "
            "ls /p2pm/public; echo ---; ls /p2pm/keys")
    try:
        kube_down(play, subset)
        podman("kube", "play", "--network", network, play)
        wait_running("p2pm-coordinator-coordinator")
        for host, files in own.items():
            head, readable, found, public, keys = podman("exec", f"{host}-peer", "sh", "-c", look).stdout.split("---")
            uid, *listing = head.split()
            assert uid == "10001"  # the image's unprivileged user
            assert listing == files  # its own peers' files, nothing else
            assert readable.split()[1::2] == [f"/p2pm/private/{f}" for f in files]
            others = {f for h, fs in own.items() if h != host for f in fs}
            leaked = sorted(p for p in found.split() if Path(p).name in others)
            assert not leaked, f"{host} sees other peers' files: {leaked}"
            assert public.split() == []  # nor the public scenario: a peer needs only its own files
            assert keys.split() == [f"{host}.key_secret", "roster.json"]  # its own CURVE key and the public roster
    finally:
        kube_down(play, subset)
        podman("network", "rm", "-f", network, check=False)
    assert_kube_gone(subset, network)


# ----------------------------------------------------------------------------- p2pm run --launch podman

def assert_run_gone(run_id: str) -> None:
    assert podman("ps", "-aq", "--filter", f"label=p2pm.run={run_id}").stdout.strip() == ""
    assert podman("network", "exists", f"p2pm-{run_id}", check=False).returncode != 0


def start_podman_run(out: Path) -> tuple[subprocess.Popen, str]:
    """``p2pm run mv37 --launch podman`` in the background; (process, run id) once its containers start."""
    proc = subprocess.Popen([*P2PM, "run", "mv37", "--launch", "podman", "--peers-per-process", PPP, "--out", str(out),
                             "--no-report", "--timeout-s", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.match(r"run ([0-9a-f]{12}): containers", line)
        if m:
            return proc, m.group(1)
    proc.wait(timeout=60)
    raise AssertionError("the launcher did not start its containers:\n" + "".join(lines))


def wait_running(name: str, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        r = podman("inspect", name, "--format", "{{.State.Running}}", check=False)
        if r.stdout.strip() == "true":
            return
        time.sleep(0.2)
    raise AssertionError(f"container {name} did not start within {timeout_s} s")


def test_launch_podman_equals_a_local_run(image, local_mv37, tmp_path):
    out = tmp_path / "run"
    t = time.monotonic()
    r = run_cli("run", "mv37", "--launch", "podman", "--image", image, "--peers-per-process", PPP, "--out", out,
                "--no-report", "--timeout-s", "60", timeout=600)
    wall = time.monotonic() - t
    assert r.returncode == 0, r.stderr + r.stdout
    run_id = re.search(r"run ([0-9a-f]{12}): containers", r.stderr).group(1)
    assert "ready after" in r.stderr and "market cleared" in r.stderr  # the progress of a local run
    summary = assert_same_results(out, local_mv37)
    assert summary["launch"] == "podman" and summary["peer_processes"] == 5
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(
        ["coordinator.log", "dso.log", "tso.log", *(p.name for p in (local_mv37 / "logs").glob("h*.log"))])
    print(f"--launch podman mv37: {wall:.1f} s (summary wall {summary['wall_s']:.1f} s), welfare "
          f"{summary['social_welfare_eur']:.2f} EUR, {summary['iterations']} iterations")
    assert_run_gone(run_id)


def test_launch_podman_cleans_up_after_ctrl_c(image, tmp_path):
    proc, run_id = start_podman_run(tmp_path / "run")
    try:
        wait_running(f"p2pm-{run_id}-peers-4")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "interrupted" in err, err
    assert_run_gone(run_id)


def test_launch_podman_names_a_killed_peer_container_and_cleans_up(image, tmp_path):
    proc, run_id = start_podman_run(tmp_path / "run")
    victim = f"p2pm-{run_id}-peers-1"
    try:
        wait_running(victim)
        # the peer container has its own private files and its own CURVE key only, read-only, and no
        # other mount of the run
        mounts = json.loads(podman("inspect", victim, "--format", "{{json .Mounts}}").stdout)
        assert sorted(m["Destination"] for m in mounts) == ["/p2pm/keys", "/p2pm/private"]
        assert all(not m["RW"] for m in mounts)
        assert len(podman("exec", victim, "ls", "/p2pm/private").stdout.split()) == 10
        host = podman("exec", victim, "printenv", "P2PM_HOST_ID").stdout.strip()
        assert podman("exec", victim, "ls", "/p2pm/keys").stdout.split() == [f"{host}.key", f"{host}.key_secret",
                                                                              "roster.json"]
        podman("kill", victim)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert f"(container {victim}) exited with code" in err and "its log ends with" in err, err
    assert_run_gone(run_id)


# ------------------------------------------------------------------------------------------- compose

def test_mv37_from_the_compose_folder_under_podman_compose(image, local_mv37, tmp_path):
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (Debian: apt-get install podman-compose; .ci/run does)")
    out = tmp_path / "compose"
    r = run_cli("deploy", "compose", "mv37", "--out", out, "--image", image, "--peers-per-process", PPP,
                "--timeout-s", "60")
    assert r.returncode == 0, r.stderr + r.stdout
    project = f"p2pm-test-{uuid.uuid4().hex[:8]}"
    compose = ["podman-compose", "-p", project, "-f", str(out / "compose.yaml")]
    label = f"label=io.podman.compose.project={project}"
    try:
        up = subprocess.run([*compose, "up", "-d"], capture_output=True, text=True, timeout=600, cwd=out)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        coordinator = next(n for n in podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split()
                           if "p2pm-coordinator" in n)
        code = podman("wait", coordinator, timeout=600).stdout.strip()
        assert code == "0", podman("logs", coordinator, check=False).stderr[-3000:]
        summary = assert_same_results(out / "results", local_mv37)  # the coordinator's volume
        assert summary["peer_processes"] == 5
    finally:
        subprocess.run([*compose, "down", "-t", "2"], capture_output=True, text=True, timeout=300, cwd=out)
        ids = podman("ps", "-aq", "--filter", label, check=False).stdout.split()
        if ids:
            podman("rm", "-f", *ids, check=False)
        podman("network", "rm", "-f", f"{project}_market", check=False)
    assert podman("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert podman("network", "exists", f"{project}_market", check=False).returncode != 0
