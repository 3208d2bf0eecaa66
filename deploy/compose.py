"""Write a docker compose file that runs a scenario as one container per role.

    python deploy/compose.py mv37 > deploy/compose.mv37.yaml
    docker compose -f deploy/compose.mv37.yaml up --abort-on-container-exit

The coordinator listens on all interfaces of its container (tcp://0.0.0.0:5555); every other role
reaches it by service name. In the mesh topology each peer advertises its own service name.
"""

from __future__ import annotations

import sys

import yaml

from common.scenario import load_scenario, resolve_path


def compose(scenario_name: str, topology: str = "relay", port: int = 5555) -> dict:
    sc = load_scenario(scenario_name)
    path = resolve_path(scenario_name)
    scen_in_image = f"/opt/p2pm/scenario{path.suffix}"
    common = {"image": "p2pm", "volumes": [f"{path.resolve()}:{scen_in_image}:ro"], "networks": ["market"]}
    coordinator = f"tcp://coordinator:{port}"
    services = {
        "coordinator": {**common, "command": ["p2pm", "coordinator", "--scenario", scen_in_image, "--bind", f"tcp://0.0.0.0:{port}",
                                                "--topology", topology, "--out", "/results", "--timeout-s", "120"],
                        "volumes": common["volumes"] + ["./results:/results"]},
        "dso": {**common, "command": ["p2pm", "dso", "--scenario", scen_in_image, "--coordinator", coordinator]},
        "tso": {**common, "command": ["p2pm", "tso", "--scenario", scen_in_image, "--coordinator", coordinator]},
    }
    for p in sc.peers:
        name = "peer-" + p.id.replace("_", "-").replace(".", "-").lower()
        services[name] = {**common, "command": ["p2pm", "peer", "--coordinator", coordinator, "--scenario", scen_in_image,
                                                "--peer-id", p.id, "--bind-host", "0.0.0.0", "--advertise-host", name,
                                                "--timeout-s", "120"]}
    return {"services": services, "networks": {"market": {}}}


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "mv37"
    topo = sys.argv[2] if len(sys.argv) > 2 else "relay"
    yaml.safe_dump(compose(name, topo), sys.stdout, sort_keys=False)
