"""Start or join Ray once per process, quietly and offline."""

from __future__ import annotations

import os

# Set before Ray or img2dataset start: no usage reporting, no update checks over the network.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
for _name, _value in QUIET_ENV.items():
    os.environ.setdefault(_name, _value)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray on demand; no-op if Ray is up."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {
        "include_dashboard": False,
        "logging_level": "WARNING",
        "runtime_env": {"env_vars": dict(QUIET_ENV)},
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
