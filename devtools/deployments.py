"""The deployments of prefect.yaml as the stacks and the tests read them: one entry by its
`flow/name` (anchors resolved), and the environment a worker adds to its flow runs."""
from __future__ import annotations

from pathlib import Path

import yaml

from .services import REPO


def deployment(name: str, prefect_yaml: Path = REPO / "prefect.yaml") -> dict:
    """The entry of deployment `flow/name` in prefect.yaml (anchors resolved)."""
    flow, _, dep = name.partition("/")
    for d in yaml.safe_load(prefect_yaml.read_text())["deployments"]:
        if d["entrypoint"].rsplit(":", 1)[-1] == flow and d["name"] == dep:
            return d
    raise KeyError(f"no deployment {name!r} in {prefect_yaml}")


def deployment_env(name: str, prefect_yaml: Path = REPO / "prefect.yaml") -> dict[str, str]:
    """The environment a worker adds to this deployment's flow runs (its job variables' env)."""
    return dict(deployment(name, prefect_yaml)["work_pool"].get("job_variables", {}).get("env", {}))
