"""Write a compose folder that runs a scenario as one container per role, each container holding
only its own data: the public scenario (read-only) for the coordinator, DSO and TSO, and for each
peer only its own private file.

    python deploy/compose.py mv37 OUT_DIR [relay|mesh]
    docker compose -f OUT_DIR/compose.yaml up --abort-on-container-exit     (or podman-compose)

OUT_DIR gets ``compose.yaml``, ``public.json`` and ``peers/<id>.json`` (one private file per peer,
mounted into that peer's container alone). The coordinator listens on all interfaces of its
container (tcp://0.0.0.0:5555); every other role reaches it by service name. In the mesh topology
each peer advertises its own service name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from common.public import write_split
from common.scenario import load_scenario


def compose(scenario_name: str, out: Path, topology: str = "relay", port: int = 5555) -> dict:
    out = Path(out).resolve()
    public, private = write_split(load_scenario(scenario_name), out)
    public_in = "/opt/p2pm/public.json"
    public_mount = f"{public}:{public_in}:ro"
    coordinator = f"tcp://coordinator:{port}"
    def base() -> dict:
        return {"image": "p2pm", "networks": ["market"]}

    services = {
        "coordinator": {**base(), "volumes": [public_mount, "./results:/results"],
                        "command": ["p2pm", "coordinator", "--scenario", public_in, "--bind", f"tcp://0.0.0.0:{port}",
                                    "--topology", topology, "--out", "/results", "--timeout-s", "120"]},
        "dso": {**base(), "volumes": [public_mount], "command": ["p2pm", "dso", "--scenario", public_in, "--coordinator", coordinator]},
        "tso": {**base(), "volumes": [public_mount], "command": ["p2pm", "tso", "--scenario", public_in, "--coordinator", coordinator]},
    }
    for pid, path in private.items():
        name = "peer-" + pid.replace("_", "-").replace(".", "-").lower()
        services[name] = {**base(), "volumes": [f"{path}:/opt/p2pm/peer.json:ro"],
                          "command": ["p2pm", "peer", "--coordinator", coordinator, "--model", "/opt/p2pm/peer.json",
                                      "--host-id", name, "--bind-host", "0.0.0.0", "--advertise-host", name,
                                      "--timeout-s", "120"]}
    spec = {"services": services, "networks": {"market": {}}}
    (out / "compose.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "mv37"
    out_dir = Path(sys.argv[2] if len(sys.argv) > 2 else f"deploy/compose-{name}")
    topo = sys.argv[3] if len(sys.argv) > 3 else "relay"
    compose(name, out_dir, topo)
    print(f"wrote {out_dir / 'compose.yaml'}, {out_dir / 'public.json'} and {out_dir / 'peers'}/")
