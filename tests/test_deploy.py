"""The deployment generators (``p2pm deploy compose|kube``): the manifests validate against the
Kubernetes schemas, each peer host gets only its own private files, addresses come from the roles'
environment variables. No container engine needed (tests/test_containers.py runs them)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from p2pm_support import invoke


def _kube(tmp_path: Path, *extra) -> list[dict]:
    out = tmp_path / "kube"
    r = invoke("deploy", "kube", "mv37", "--out", out, "--peers-per-process", "10", *extra)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["collect.yaml", "kube.yaml"]
    assert (out / "kube.yaml").stat().st_mode & 0o077 == 0  # it holds the Secrets
    return [d for d in yaml.safe_load_all((out / "kube.yaml").read_text()) if d]


@pytest.mark.parametrize("topology", ["relay", "mesh"])
def test_kube_manifests_validate_against_the_kubernetes_schemas(tmp_path, topology):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    docs = _kube(tmp_path, "--topology", topology)
    docs.append(yaml.safe_load((tmp_path / "kube" / "collect.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    # a bad object is refused: the validation can fail
    broken = json.loads(json.dumps(next(d for d in docs if d["kind"] == "Pod")))
    broken["spec"]["containers"][0]["resources"]["requests"]["cpu"] = {"not": "a quantity"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


def test_kube_peer_hosts_grouped_each_with_its_own_secret(tmp_path):
    docs = _kube(tmp_path, "--topology", "mesh")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    peer_pods = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["labels"]["p2pm/role"] == "peer"]
    assert len(peer_pods) == 5  # mv37: 50 peers, 10 per host
    seen = set()
    for pod in peer_pods:
        host = pod["metadata"]["name"]
        vol, key = pod["spec"]["volumes"]
        assert vol["secret"]["secretName"] == host  # its own Secret and its own key, nothing else
        assert key["secret"]["secretName"] == f"p2pm-key-{host}"
        ids = {k.removesuffix(".json") for k in by[("Secret", host)]["data"]}
        assert len(ids) == 10 and not ids & seen
        seen |= ids
        c = pod["spec"]["containers"][0]
        models = [a for a in c["command"] if a.startswith("/p2pm/private/")]
        assert {Path(m).stem for m in models} == ids
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["P2PM_COORDINATOR"] == "tcp://p2pm-coordinator:5555"
        assert env["P2PM_ADVERTISE_HOST"] == host and ("Service", host) in by  # mesh: a name per peer host
        assert c["resources"]["requests"]["cpu"] and pod["spec"]["securityContext"]["runAsNonRoot"]
        for key, value in by[("Secret", host)]["data"].items():
            assert json.loads(base64.b64decode(value))["id"] == key.removesuffix(".json")
    assert len(seen) == 50
    # the public scenario: a ConfigMap mounted by the coordinator, DSO and TSO only; no private data in it
    public = json.loads(by[("ConfigMap", "p2pm-public")]["data"]["public.json"])
    assert public["schema"] == "p2pm.public/1" and "peers" not in public
    for role in ("coordinator", "dso", "tso"):
        pod = by[("Pod", f"p2pm-{role}")]
        assert [v.get("configMap", {}).get("name") for v in pod["spec"]["volumes"]][0] == "p2pm-public"
        assert [v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v] == [f"p2pm-key-{role}"]
    assert ("Service", "p2pm-coordinator") in by and ("PersistentVolumeClaim", "p2pm-results") in by
    # CURVE: a key Secret per role holding its own secret key and the public roster, nothing else
    key_secrets = {d["metadata"]["name"]: d["data"] for d in docs
                   if d["kind"] == "Secret" and d["metadata"]["name"].startswith("p2pm-key-")}
    hosts = {p["metadata"]["name"] for p in peer_pods}
    assert set(key_secrets) == {f"p2pm-key-{r}" for r in ("coordinator", "dso", "tso", *hosts)}
    roster = json.loads(base64.b64decode(key_secrets["p2pm-key-dso"]["roster.json"]))
    assert set(roster["roles"]) == {"coordinator", "dso", "tso", *hosts}
    for name, data in key_secrets.items():
        role = name.removeprefix("p2pm-key-")
        assert sorted(data) == sorted([f"{role}.key_secret", "roster.json"])
        assert b"secret-key" in base64.b64decode(data[f"{role}.key_secret"])
    envs = [{e["name"]: e["value"] for e in d["spec"]["containers"][0]["env"]} for d in docs if d["kind"] == "Pod"
            and d["metadata"]["name"] != "p2pm-results"]
    assert all(e.get("P2PM_KEYS") == "/p2pm/keys" and "P2PM_INSECURE" not in e for e in envs)


def test_compose_folder_mounts_each_peer_host_its_own_folder(tmp_path):
    out = tmp_path / "compose"
    r = invoke("deploy", "compose", "mv37", "--out", out, "--peers-per-process", "10", "--image", "p2pm:test")
    assert r.exit_code == 0, r.output
    spec = yaml.safe_load((out / "compose.yaml").read_text())
    services = spec["services"]
    hosts = [n for n, s in services.items() if s["labels"]["p2pm.role"] == "peer"]
    assert len(hosts) == 5 and all(s["image"] == "p2pm:test" for s in services.values())
    for host in hosts:
        mount, key = services[host]["volumes"]
        assert mount == f"./private/{host}:/p2pm/private:ro" and key == f"./keys/{host}:/p2pm/keys:ro"
        secret = out / "keys" / host / f"{host}.key_secret"
        assert secret.stat().st_mode & 0o077 == 0 and secret.parent.stat().st_mode & 0o077 == 0
        assert sorted(p.name for p in secret.parent.glob("*.key_secret")) == [secret.name]  # only its own
        folder = out / "private" / host
        assert len(list(folder.iterdir())) == 10 and folder.stat().st_mode & 0o077 == 0
        assert all(f.stat().st_mode & 0o077 == 0 for f in folder.iterdir())
    for role in ("p2pm-coordinator", "p2pm-dso", "p2pm-tso"):
        assert "./public:/p2pm/public:ro" in services[role]["volumes"]
        assert not any("private" in v for v in services[role]["volumes"])
        assert f"./keys/{role.removeprefix('p2pm-')}:/p2pm/keys:ro" in services[role]["volumes"]
        assert services[role]["environment"]["P2PM_KEYS"] == "/p2pm/keys"
    roster = json.loads((out / "keys" / "roster.json").read_text())
    assert set(roster["roles"]) == {"coordinator", "dso", "tso", *hosts}
    # --insecure: clearly without keys
    r = invoke("deploy", "compose", "mv37", "--out", tmp_path / "plain", "--insecure")
    assert r.exit_code == 0 and "INSECURE" in r.output, r.output
    plain = yaml.safe_load((tmp_path / "plain" / "compose.yaml").read_text())["services"]
    assert all(s["environment"].get("P2PM_INSECURE") == "1" and "P2PM_KEYS" not in s["environment"]
               for s in plain.values())
    assert not (tmp_path / "plain" / "keys").exists()
    assert "./results:/results" in services["p2pm-coordinator"]["volumes"]
    assert json.loads((out / "public" / "public.json").read_text())["schema"] == "p2pm.public/1"


def test_roles_take_their_addresses_from_the_environment():
    import typer.main

    from p2pm.cli import app

    cmd = typer.main.get_command(app)
    envvars = {name: {p.name: getattr(p, "envvar", None) for p in cmd.commands[name].params}
               for name in ("coordinator", "peer", "dso", "tso")}
    assert envvars["coordinator"]["scenario"] == "P2PM_SCENARIO" and envvars["coordinator"]["bind"] == "P2PM_BIND"
    assert envvars["coordinator"]["out"] == "P2PM_OUT" and envvars["coordinator"]["timeout_s"] == "P2PM_TIMEOUT_S"
    assert envvars["peer"]["coordinator"] == "P2PM_COORDINATOR" and envvars["peer"]["host_id"] == "P2PM_HOST_ID"
    assert envvars["peer"]["advertise_host"] == "P2PM_ADVERTISE_HOST"
    for svc in ("dso", "tso"):
        assert envvars[svc]["coordinator"] == "P2PM_COORDINATOR" and envvars[svc]["scenario"] == "P2PM_SCENARIO"


def test_bad_deployments_are_refused_before_anything_is_written(tmp_path):
    r = invoke("deploy", "kube", "ieee33-ev", "--out", tmp_path / "k", "--topology", "mesh")
    assert r.exit_code == 2 and "--topology mesh" in r.output
    r = invoke("deploy", "compose", "no-such-scenario", "--out", tmp_path / "c")
    assert r.exit_code == 2
    assert not (tmp_path / "k").exists() and not (tmp_path / "c").exists()


def test_a_private_file_written_base64_by_the_engine_is_read(tmp_path):
    """podman 4.3's ``kube play`` writes a Secret's data into its volume without decoding it."""
    from peer_node.main import load_models

    r = invoke("scenarios", "split", "mv37", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    plain = tmp_path / "peers" / "pv3.json"
    encoded = tmp_path / "pv3.b64"
    encoded.write_bytes(base64.b64encode(plain.read_bytes()))
    (a,), (b,) = load_models([str(plain)]), load_models([str(encoded)])
    assert a.id == b.id == "pv3"
    garbage = tmp_path / "bad.json"
    garbage.write_text("not json")
    with pytest.raises(ValueError):
        load_models([str(garbage)])
