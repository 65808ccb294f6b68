"""Ray for the driver: joining or starting a cluster, worker groups on GPUs or CPUs (gloo), released
explicitly."""

from __future__ import annotations

import os

import ray
from verl import DataProto
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VERL_LOGGING_LEVEL": "WARNING"}}


def init_ray(device: str) -> None:
    """Join the cluster `ray job submit` (RAY_ADDRESS) points at, or start a private local one."""
    if ray.is_initialized():
        return
    # Workers see the driver's hub setting (Ray starts them from the raylet's environment, not ours).
    env = {**RUNTIME_ENV["env_vars"], "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    kwargs = {"runtime_env": {"env_vars": env}}
    if not os.environ.get("RAY_ADDRESS") and device == "cpu":
        # A private instance (never someone's `ray start` cluster); logical CPUs so that training and
        # rollout groups (one CPU per worker each) fit on a 2-core laptop.
        kwargs.update(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 8))
    ray.init(**kwargs)


def make_worker_group(worker_cls, device: str, n_per_node: int, nnodes: int = 1, colocate: int = 1,
                      **init_args) -> tuple[RayWorkerGroup, RayResourcePool]:
    """(group, pool): nnodes x n_per_node processes of `worker_cls`, one GPU (or one CPU) per bundle.
    `colocate` > 1 lets that many groups share each bundle (e.g. training + rollout on one GPU).
    Release with `release_worker_group` (placement groups outlive their actors otherwise)."""
    # max_colocate_count bounds the CPUs of a bundle: verl's default of 10 never fits a laptop.
    pool = RayResourcePool(process_on_nodes=[n_per_node] * nnodes, use_gpu=device == "cuda",
                           max_colocate_count=colocate)
    group = RayWorkerGroup(pool, RayClassWithInitArgs(ray.remote(worker_cls), **init_args), device_name=device)
    return group, pool


def release_worker_group(group: RayWorkerGroup, pool: RayResourcePool | None) -> None:
    """Kill the group's actors and free the pool's placement groups (when `pool` is given: its owner)."""
    for worker in group.workers:
        ray.kill(worker)
    for pg in (pool.pgs or []) if pool is not None else []:
        ray.util.remove_placement_group(pg)


def first_metrics(output: DataProto) -> dict:
    """Rank 0's metrics from a DP-collected DataProto (other ranks report None)."""
    return {k: v[0] if isinstance(v, list) else v for k, v in output.meta_info["metrics"].items()}
