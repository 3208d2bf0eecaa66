"""Deployment files for a scenario: a compose folder or Kubernetes manifests, one container per role.

``p2pm deploy compose SCENARIO --out DIR`` and ``p2pm deploy kube SCENARIO --out DIR`` split the
scenario (``common.public``) and write everything a run needs:

- the **public scenario** for the coordinator, the DSO and the TSO: a ConfigMap (compose: a
  read-only mount of ``public/public.json``);
- each **peer host's private files** (``--peers-per-process`` peers per host): its own Secret
  (compose: its own read-only mount of ``private/<host>/``); no other container sees them;
- the **coordinator** listening on a fixed port behind a Service named ``p2pm-coordinator`` (the
  pod and the compose service carry the same name), its results on a volume (Kubernetes: the
  PersistentVolumeClaim ``p2pm-results``; compose: ``./results``);
- the **DSO** and **TSO** services and the **peer hosts**; addresses by environment variables
  (``P2PM_COORDINATOR``, ``P2PM_SCENARIO``, ``P2PM_BIND``, ... are the ``envvar`` of the roles' options);
  in the mesh topology each peer host advertises its own name (Kubernetes: a headless Service each);
- **CURVE keys** (``common.security``, unless ``--insecure``): a key pair per role made for the
  deployment; each role gets only its own secret key with the public roster (Kubernetes: a Secret
  ``p2pm-key-<role>`` per role; compose: its own read-only mount of ``keys/<role>/``), at
  ``/p2pm/keys`` (``P2PM_KEYS``); ``--insecure`` sets ``P2PM_INSECURE`` instead;
- resource requests per role.

Every container runs as the image's unprivileged user (uid 10001) with absolute command paths, so
that the files run unchanged under ``podman kube play`` / ``kubectl apply`` and ``podman-compose`` /
``docker compose``. Pure file generation: nothing here talks to a container engine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

PORT = 5555
UID = 10001  # the image's user (deploy/Containerfile)
P2PM = "/opt/p2pm/venv/bin/p2pm"  # absolute: an image imported from a root file system has no PATH of its own
PUBLIC_DIR, PRIVATE_DIR, RESULTS_DIR, KEYS_DIR = "/p2pm/public", "/p2pm/private", "/results", "/p2pm/keys"
COORDINATOR = "p2pm-coordinator"
LABEL = "app.kubernetes.io/name"

# requests per role (the coordinator runs the clearing's array work, the DSO pandapower's AC power
# flow, a peer process a few small QPs per peer and iteration)
REQUESTS = {"coordinator": ("500m", "512Mi"), "dso": ("500m", "768Mi"), "tso": ("100m", "256Mi")}


def peer_requests(n_peers: int) -> tuple[str, str]:
    return f"{min(100 + 20 * n_peers, 1000)}m", f"{96 + 8 * n_peers}Mi"


def host_name(index: int) -> str:
    """A peer host's name: pod, Secret, compose service and (mesh) the address it advertises."""
    return f"p2pm-peers-{index}"


def peer_hosts(scenario, private_files: dict[str, Path], peers_per_process: int) -> list[tuple[str, list[tuple[str, Path]]]]:
    """[(host name, [(peer id, private file), ...]), ...], grouped as the local launcher groups them."""
    from p2pm.launcher import _peer_groups

    return [(host_name(i), g) for i, g in enumerate(_peer_groups(scenario, private_files, peers_per_process))]


def _security_env(secure: bool) -> dict[str, str]:
    return {"P2PM_KEYS": KEYS_DIR} if secure else {"P2PM_INSECURE": "1"}


def key_secret_name(role: str) -> str:
    """The Kubernetes Secret of a role's key (its secret key and the public roster)."""
    return f"p2pm-key-{role}"


def _write_keys(scenario, out: Path, hosts) -> Path:
    """out/keys/roster.json and out/keys/<role>/ (the role's secret key, 0600 in a folder of 0700)."""
    from common.security import write_keys

    folder = out / "keys"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o755)
    write_keys(folder, ["coordinator", "dso", "tso", *(h for h, _ in hosts)],
               {h: [pid for pid, _ in g] for h, g in hosts}, scenario.name)
    return folder


def _coordinator_env(topology: str, timeout_s: float) -> dict[str, str]:
    return {"P2PM_SCENARIO": f"{PUBLIC_DIR}/public.json", "P2PM_BIND": f"tcp://0.0.0.0:{PORT}",
            "P2PM_TOPOLOGY": topology, "P2PM_OUT": RESULTS_DIR, "P2PM_TIMEOUT_S": f"{timeout_s:g}"}


def _service_env(timeout_s: float) -> dict[str, str]:
    return {"P2PM_SCENARIO": f"{PUBLIC_DIR}/public.json", "P2PM_COORDINATOR": f"tcp://{COORDINATOR}:{PORT}",
            "P2PM_TIMEOUT_S": f"{timeout_s:g}"}


def _peer_env(host: str, topology: str, timeout_s: float) -> dict[str, str]:
    env = {"P2PM_COORDINATOR": f"tcp://{COORDINATOR}:{PORT}", "P2PM_HOST_ID": host, "P2PM_TIMEOUT_S": f"{timeout_s:g}"}
    if topology == "mesh":
        env.update(P2PM_BIND_HOST="0.0.0.0", P2PM_ADVERTISE_HOST=host)
    return env


def _peer_command(group: list[tuple[str, Path]]) -> list[str]:
    cmd = [P2PM, "peer"]
    for pid, _ in group:
        cmd += ["--model", f"{PRIVATE_DIR}/{pid}.json"]
    return cmd


def _write_inputs(scenario, out: Path, peers_per_process: int):
    """out/public/public.json and out/private/<host>/<id>.json (0600 in folders of 0700)."""
    from common.public import write_split

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("public", "private"):
        shutil.rmtree(out / sub, ignore_errors=True)
    staging = out / ".split"
    shutil.rmtree(staging, ignore_errors=True)
    public, private = write_split(scenario, staging)
    (out / "public").mkdir()
    public_path = Path(shutil.move(str(public), out / "public" / "public.json"))
    hosts = peer_hosts(scenario, private, peers_per_process)
    placed = []
    for host, group in hosts:
        folder = out / "private" / host
        folder.mkdir(parents=True, mode=0o700)
        placed.append((host, [(pid, Path(shutil.move(str(path), folder / f"{pid}.json"))) for pid, path in group]))
    shutil.rmtree(staging, ignore_errors=True)
    return public_path, placed


def _check(scenario, topology: str) -> None:
    if scenario.market.kind == "community" and topology == "mesh":
        raise ValueError("--topology mesh: the community market runs in the relay topology "
                         "(the network agent couples every peer)")


# --------------------------------------------------------------------------------------- compose

def compose(scenario, out: Path, *, image: str = "p2pm", topology: str = "relay", peers_per_process: int = 1,
            timeout_s: float = 120.0, secure: bool = True) -> Path:
    """Write ``out/compose.yaml`` with ``out/public/``, ``out/private/<host>/`` and ``out/results/``.

    A bind mount keeps the owner and mode of the host's files: the private files are 0600. Written by
    root, they (and ``results/``) are given to the image's user; written by another user, every
    container runs as that user (``user:``), who owns them."""
    import yaml

    _check(scenario, topology)
    out = Path(out).resolve()
    public_path, hosts = _write_inputs(scenario, out, peers_per_process)
    shutil.rmtree(out / "keys", ignore_errors=True)
    if secure:
        _write_keys(scenario, out, hosts)
    results = out / "results"
    results.mkdir(exist_ok=True)
    user = None
    if os.geteuid() == 0:
        for path in [results, *(out / "private").rglob("*"), *((out / "keys").rglob("*") if secure else [])]:
            os.chown(path, UID, UID)
        os.chown(out / "private", UID, UID)
    else:
        user = f"{os.getuid()}:{os.getgid()}"

    def service(role: str, command: list[str], env: dict, volumes: list[str], cpu: str, mem: str) -> dict:
        s = {"image": image, "command": command, "environment": env, "volumes": volumes, "networks": ["market"],
             "deploy": {"resources": {"reservations": {"cpus": str(_cpus(cpu)), "memory": mem.replace("Mi", "M")}}},
             "labels": {LABEL: "p2pm", "p2pm.role": role}}
        if user:
            s["user"] = user
        return s

    public_mount = f"./public:{PUBLIC_DIR}:ro"
    sec = _security_env(secure)

    def key(role: str) -> list[str]:
        return [f"./keys/{role}:{KEYS_DIR}:ro"] if secure else []

    services = {
        COORDINATOR: {**service("coordinator", [P2PM, "coordinator"], {**_coordinator_env(topology, timeout_s), **sec},
                                [public_mount, f"./results:{RESULTS_DIR}", *key("coordinator")],
                                *REQUESTS["coordinator"]),
                      "expose": [str(PORT)]},
        "p2pm-dso": service("dso", [P2PM, "dso"], {**_service_env(timeout_s), **sec}, [public_mount, *key("dso")],
                            *REQUESTS["dso"]),
        "p2pm-tso": service("tso", [P2PM, "tso"], {**_service_env(timeout_s), **sec}, [public_mount, *key("tso")],
                            *REQUESTS["tso"]),
    }
    for host, group in hosts:
        services[host] = service("peer", _peer_command(group), {**_peer_env(host, topology, timeout_s), **sec},
                                 [f"./private/{host}:{PRIVATE_DIR}:ro", *key(host)], *peer_requests(len(group)))
    spec = {"name": f"p2pm-{_dns(scenario.name)}", "services": services, "networks": {"market": {}}}
    path = out / "compose.yaml"
    header = (f"# p2pm {scenario.name}: {len(hosts)} peer hosts, topology {topology}, "
              f"{'CURVE keys in ./keys (one mount per role)' if secure else 'INSECURE: no CURVE'}. Run:\n"
              f"#   podman-compose -f compose.yaml up --abort-on-container-exit   (or docker compose)\n"
              f"# results: ./results (the coordinator's {RESULTS_DIR})\n")
    path.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    return path


def _cpus(millis: str) -> float:
    return int(millis.rstrip("m")) / 1000


def _dns(name: str) -> str:
    """A DNS-1123 label from a scenario name."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return out[:40] or "scenario"


# ------------------------------------------------------------------------------------ kubernetes

def _container(name: str, image: str, command: list[str], env: dict, mounts: list[dict], cpu: str, mem: str) -> dict:
    # no containerPort: the Service names the port (podman kube play would publish a containerPort on the host)
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": command,
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "resources": {"requests": {"cpu": cpu, "memory": mem}},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": mounts}


def _pod(name: str, role: str, container: dict, volumes: list[dict], labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {LABEL: "p2pm", "p2pm/role": role, **(labels or {})}},
            # a shared process namespace: the pod's pause process is PID 1 and the role gets SIGTERM's default
            # action (a Python process as PID 1 would ignore it)
            "spec": {"restartPolicy": "Never", "hostname": name, "shareProcessNamespace": True,
                     "securityContext": {"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID, "runAsNonRoot": True},
                     "containers": [container], "volumes": volumes}}


def kube_documents(scenario, public_text: str, hosts: list[tuple[str, list[tuple[str, bytes]]]], *, image: str,
                   topology: str, timeout_s: float, results_size: str = "1Gi",
                   keys: dict[str, dict[str, bytes]] | None = None) -> list[dict]:
    """The Kubernetes objects of a run (hosts: [(host, [(peer id, private file content), ...])];
    keys: {role: {file name: content}} of each role's key folder, None: without CURVE)."""
    public_vol = {"name": "public", "configMap": {"name": "p2pm-public"}}
    public_mount = {"name": "public", "mountPath": PUBLIC_DIR, "readOnly": True}
    sec = _security_env(keys is not None)

    def key_vol(role: str) -> list[dict]:
        return ([{"name": "key", "secret": {"secretName": key_secret_name(role), "defaultMode": 0o440,
                                             "optional": False}}] if keys is not None else [])

    def key_mount(role: str) -> list[dict]:
        return [{"name": "key", "mountPath": KEYS_DIR, "readOnly": True}] if keys is not None else []
    docs: list[dict] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p2pm-public", "labels": {LABEL: "p2pm"}},
         "data": {"public.json": public_text}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "p2pm-results", "labels": {LABEL: "p2pm"}},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": results_size}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": COORDINATOR, "labels": {LABEL: "p2pm"}},
         "spec": {"selector": {LABEL: "p2pm", "p2pm/role": "coordinator"},
                  "ports": [{"name": "zmq", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}},
        _pod(COORDINATOR, "coordinator",
             _container("coordinator", image, [P2PM, "coordinator"], {**_coordinator_env(topology, timeout_s), **sec},
                        [public_mount, {"name": "results", "mountPath": RESULTS_DIR}, *key_mount("coordinator")],
                        *REQUESTS["coordinator"]),
             [public_vol, {"name": "results", "persistentVolumeClaim": {"claimName": "p2pm-results"}},
              *key_vol("coordinator")]),
    ]
    for role, files in (keys or {}).items():
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": key_secret_name(role), "labels": {LABEL: "p2pm", "p2pm/key": role}},
                     "data": {name: base64.b64encode(content).decode() for name, content in files.items()}})
    for svc in ("dso", "tso"):
        docs.append(_pod(f"p2pm-{svc}", svc, _container(svc, image, [P2PM, svc], {**_service_env(timeout_s), **sec},
                                                         [public_mount, *key_mount(svc)], *REQUESTS[svc]),
                         [public_vol, *key_vol(svc)]))
    for host, group in hosts:
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": host, "labels": {LABEL: "p2pm", "p2pm/host": host}},
                     "data": {f"{pid}.json": base64.b64encode(content).decode() for pid, content in group}})
        docs.append(_pod(host, "peer",
                         _container("peer", image, _peer_command(group), {**_peer_env(host, topology, timeout_s), **sec},
                                    [{"name": "private", "mountPath": PRIVATE_DIR, "readOnly": True}, *key_mount(host)],
                                    *peer_requests(len(group))),
                         [{"name": "private", "secret": {"secretName": host, "defaultMode": 0o440, "optional": False}},
                          *key_vol(host)],
                         labels={"p2pm/host": host}))
        if topology == "mesh":  # a stable name for the address the peer host advertises to its partners
            docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": host, "labels": {LABEL: "p2pm"}},
                         "spec": {"clusterIP": "None", "selector": {LABEL: "p2pm", "p2pm/host": host}}})
    return docs


def collect_pod(image: str) -> dict:
    """A pod that holds the results volume open for ``kubectl cp`` once the coordinator has finished."""
    return _pod("p2pm-results", "results",
                _container("results", image, ["/opt/p2pm/venv/bin/python", "-c", "import time; time.sleep(86400)"],
                           {}, [{"name": "results", "mountPath": RESULTS_DIR, "readOnly": True}], "10m", "32Mi"),
                [{"name": "results", "persistentVolumeClaim": {"claimName": "p2pm-results"}}])


def kube(scenario, out: Path, *, image: str = "p2pm", topology: str = "relay", peers_per_process: int = 1,
         timeout_s: float = 120.0, secure: bool = True) -> Path:
    """Write ``out/kube.yaml`` (every object of the run) and ``out/collect.yaml`` (the results pod).
    The private files go into the Secrets only: nothing private is left in ``out`` besides kube.yaml
    (mode 0600)."""
    import yaml

    _check(scenario, topology)
    out = Path(out).resolve()
    public_path, hosts = _write_inputs(scenario, out, peers_per_process)
    contents = [(host, [(pid, path.read_bytes()) for pid, path in group]) for host, group in hosts]
    keys = None
    if secure:
        folder = _write_keys(scenario, out, hosts)
        keys = {d.name: {f.name: f.read_bytes() for f in d.iterdir() if f.name.endswith((".key_secret", "roster.json"))}
                for d in sorted(folder.iterdir()) if d.is_dir()}
    docs = kube_documents(scenario, public_path.read_text(), contents, image=image, topology=topology,
                          timeout_s=timeout_s, keys=keys)
    for sub in ("private", "public", "keys"):  # all are inside kube.yaml now
        shutil.rmtree(out / sub, ignore_errors=True)
    path = out / "kube.yaml"
    header = (f"# p2pm {scenario.name}: {len(hosts)} peer hosts, topology {topology}; holds the peers' private data "
              f"{'and every role' + chr(39) + 's CURVE key ' if secure else ''}(Secrets)"
              f"{'' if secure else '; INSECURE: no CURVE'}.\n#   kubectl apply -f kube.yaml     or     podman kube play --network NET kube.yaml\n"
              f"# results: the PersistentVolumeClaim p2pm-results (see collect.yaml)\n")
    path.touch(mode=0o600)
    path.write_text(header + yaml.safe_dump_all(docs, sort_keys=False))
    (out / "collect.yaml").write_text(
        "# once the coordinator pod has completed:\n#   kubectl apply -f collect.yaml && kubectl wait --for=condition=Ready "
        "pod/p2pm-results\n#   kubectl cp p2pm-results:/results ./results && kubectl delete -f collect.yaml\n"
        + yaml.safe_dump(collect_pod(image), sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------- CLI

import typer  # noqa: E402  (the CLI imports typer anyway; the generators above need none of it)
from enum import Enum  # noqa: E402
from typing import Annotated  # noqa: E402

deploy_app = typer.Typer(no_args_is_help=True,
                         help="Write deployment files for a scenario: a compose folder or Kubernetes manifests.")


class Topology(str, Enum):
    relay = "relay"
    mesh = "mesh"


ScenarioArg = Annotated[str, typer.Argument(help="Built-in scenario name (see `p2pm scenarios`) or a YAML/TOML file.")]
OutOpt = Annotated[Path, typer.Option(help="Folder to write the deployment to.")]
ImageOpt = Annotated[str, typer.Option(help="The p2pm image (deploy/Containerfile) as the cluster or engine knows it.",
                                       envvar="P2PM_IMAGE")]
PppOpt = Annotated[int, typer.Option(help="Peers hosted by one peer container (pod).", min=1)]
TopologyOpt = Annotated[Topology, typer.Option(help="relay: trades go through the coordinator; mesh: peer to peer "
                                                    "(each peer host advertises its own name).")]
TimeoutOpt = Annotated[float, typer.Option(help="Deadline for any single wait; containers start slower than processes.",
                                           min=0.1)]


InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Without CURVE keys: no authentication and no encryption "
                                                             "between the roles (experiments only).")]


def _generate(kind: str, scenario: str, out: Path, image: str, peers_per_process: int, topology: Topology,
              timeout_s: float, insecure: bool = False) -> None:
    from p2pm.cli import EXIT_BAD_INPUT, _fail, _load

    sc = _load(scenario)
    try:
        path = (compose if kind == "compose" else kube)(sc, out, image=image, topology=topology.value,
                                                          peers_per_process=peers_per_process, timeout_s=timeout_s,
                                                          secure=not insecure)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    n_hosts = len(list(peer_hosts(sc, {p: Path() for p in _peer_ids(sc)}, peers_per_process)))
    typer.echo(f"wrote {path} ({sc.name}: coordinator, dso, tso and {n_hosts} peer hosts of up to "
               f"{peers_per_process} peers; topology {topology.value}; image {image}; "
               f"{'INSECURE: no CURVE' if insecure else 'CURVE: a key per role'})")


def _peer_ids(sc) -> list[str]:
    return [p.id for p in sc.peers]


@deploy_app.command("compose")
def compose_cmd(scenario: ScenarioArg, out: OutOpt, image: ImageOpt = "p2pm", peers_per_process: PppOpt = 1,
                topology: TopologyOpt = Topology.relay, timeout_s: TimeoutOpt = 120.0, insecure: InsecureOpt = False):
    """A compose folder: compose.yaml, public/ (read-only mount of the coordinator, DSO and TSO),
    private/<host>/ (each peer host's own mount), keys/<role>/ (each role's own CURVE key and the
    public roster) and results/ (the coordinator's)."""
    _generate("compose", scenario, out, image, peers_per_process, topology, timeout_s, insecure)


@deploy_app.command("kube")
def kube_cmd(scenario: ScenarioArg, out: OutOpt, image: ImageOpt = "p2pm", peers_per_process: PppOpt = 1,
             topology: TopologyOpt = Topology.relay, timeout_s: TimeoutOpt = 120.0, insecure: InsecureOpt = False):
    """Kubernetes manifests: kube.yaml (ConfigMap of the public scenario, one Secret and one Pod per
    peer host, a Secret with each role's CURVE key, coordinator Pod and Service, DSO and TSO Pods,
    results volume claim) and collect.yaml (a pod to copy the results from)."""
    _generate("kube", scenario, out, image, peers_per_process, topology, timeout_s, insecure)
