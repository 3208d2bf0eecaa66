"""How the scenario builders write a built-in scenario: a hand-written header, then the YAML with
number lists on one line (series stay readable)."""

from __future__ import annotations

import yaml


class _Dumper(yaml.SafeDumper):
    pass


def _flow_list(dumper, data):
    flow = all(isinstance(x, (int, float)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _flow_list)


def scenario_yaml(scenario: dict, header: str) -> str:
    return header + "\n" + yaml.dump(scenario, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
