"""Joining or starting the Ray cluster.

Under ``ray job submit`` (or with ``RAY_ADDRESS`` set, or ``cluster.address`` given) the job joins the
running cluster. Otherwise it starts a private local cluster bound to 127.0.0.1, with the dashboard
off or on loopback, so that nothing listens on a public interface (DESIGN.md, Conventions).
"""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Environment every actor needs; propagated through the job's runtime_env so that actors on other
# nodes see the same settings as the driver.
_ACTOR_ENV = {
    # torch tensors in the object store without pickling copies (STACK_NOTES: 0.65 s -> 1.6 ms / 200 MB)
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # keep per-step console output readable: no progress bars or info chatter from the actors
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TQDM_DISABLE": "1",
}


def actor_env() -> dict[str, str]:
    """Environment variables given to every trace_rl actor (merged into ``runtime_env.env_vars``)."""
    env = dict(_ACTOR_ENV)
    for key in ("TRACE_RL_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_LOGGING_LEVEL",
                "TRANSFORMERS_VERBOSITY"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             resources: dict[str, float] | None = None, include_dashboard: bool = False,
             namespace: str = "trace_rl", log_to_driver: bool = True) -> dict[str, Any]:
    """Connect to Ray; returns ``{"address": ..., "started_local": bool}``.

    ``address=None`` and no ``RAY_ADDRESS`` in the environment starts a local cluster on 127.0.0.1.
    ``num_cpus`` for a local cluster is a *logical* count: the default (at least 8) leaves room for
    the rollout, learner and service actors on a 2-core machine; threads are set per actor.
    """
    import ray

    for key, value in _ACTOR_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "started_local": False}
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": actor_env()}
    if address:
        # a submitted job's runtime_env already sets some of these (ray job submit --runtime-env-json); Ray
        # refuses to merge a driver runtime_env that sets the same variables, and actors inherit the job's
        job_env = _job_env_vars()
        runtime_env = {"env_vars": {k: v for k, v in actor_env().items() if k not in job_env}}
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env,
                 log_to_driver=log_to_driver)
        log.info("joined Ray cluster at %s", address)
        return {"address": address, "started_local": False}
    if num_cpus is None:
        num_cpus = max(8, os.cpu_count() or 1)
    _pin_to_loopback()
    kwargs: dict[str, Any] = dict(
        # "local": always a new private cluster, even when `ray start` left one running on this machine
        # (a bare ray.init() would join that one; to join it, pass its address or set RAY_ADDRESS)
        address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, namespace=namespace,
        include_dashboard=include_dashboard, runtime_env=runtime_env, log_to_driver=log_to_driver,
        # no idle workers prestarted for the driver: every trace_rl actor sets its own runtime_env (thread
        # counts), so none could use them, and on a small machine they cost start-up CPU (~1 s each)
        _system_config={"prestart_worker_first_driver": False},
    )
    if include_dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    if resources:
        kwargs["resources"] = dict(resources)
    ctx = ray.init(**kwargs)
    log.info("started a local Ray cluster on 127.0.0.1 (%s logical CPUs)", num_cpus)
    return {"address": ctx.address_info.get("gcs_address"), "started_local": True}


def _job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the submitted job's runtime_env (under ``ray job submit``; else empty)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def _pin_to_loopback() -> None:
    """Make a locally started cluster bind every service to 127.0.0.1.

    Ray replaces ``_node_ip_address="127.0.0.1"`` by the machine's routable address unless its
    "no cluster" switch is set (as on macOS/Windows). The switch is read by the driver at call time
    and by every Ray process it spawns through the environment; it is only set for a private local
    cluster, never when joining a real one (a joining driver must report its real node IP).
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (for torch.distributed rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """This node's IP as Ray knows it (127.0.0.1 on a local cluster)."""
    import ray

    return ray.util.get_node_ip_address()
