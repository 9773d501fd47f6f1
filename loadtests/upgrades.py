"""Config changes and scale-downs of a running Serve app under streaming load: `serve deploy` of an edited config (what
the controller does with it: in-place `reconfigure` or a rolling replacement), then how many requests failed or were
cut, how long the change took to settle, which replicas were replaced, and the KV held afterwards."""

import copy
import time

from ray import serve

from deployments.replicas import replica_actor_names

APP = "crosstrim"


def deployments_of(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def edited(config: dict, change) -> dict:
    """A deep copy of `config` with `change(copy)` applied (change edits it in place)."""
    out = copy.deepcopy(config)
    change(out)
    return out


def replicas(app: str = APP) -> dict[str, list[str]]:
    """Each deployment's live replica actor names: a replaced replica gets a new name."""
    names = serve.status().applications[app].deployments
    return {d: replica_actor_names(app, d) for d in names}


def settled(app: str, want: dict[str, int]) -> bool:
    status = serve.status().applications.get(app)
    if status is None or str(status.status) not in ("RUNNING", "ApplicationStatus.RUNNING"):
        return False
    return all({str(k): int(v) for k, v in status.deployments[d].replica_states.items() if v} == {"RUNNING": n}
               for d, n in want.items())


def apply(config: dict, want: dict[str, int], timeout_s: float = 600, app: str = APP) -> float:
    """`serve deploy` of `config` (the controller's deploy_apps, as the CLI and `serve run` do) and the seconds until
    every deployment runs exactly `want[name]` replicas of the new version, none starting or stopping."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    t0 = time.monotonic()
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    time.sleep(2)  # the controller picks the new target up on its next loop
    streak = 0
    while time.monotonic() - t0 < timeout_s:
        streak = streak + 1 if settled(app, want) else 0
        if streak >= 3:  # three polls in a row: not a moment between two replicas' swaps
            return time.monotonic() - t0
        time.sleep(1)
    raise TimeoutError(f"not settled after {timeout_s}s: {serve.status().applications[app].deployments}")
