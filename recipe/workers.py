"""Ray for the driver: joining or starting a cluster, worker groups on GPUs or CPUs (gloo), released
explicitly."""

from __future__ import annotations

import logging
import os

import ray
from verl import DataProto
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

from flythinker_worker.ports import master_port_range

RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VERL_LOGGING_LEVEL": "WARNING"}}
logger = logging.getLogger(__name__)


def match_verl_platform(device: str) -> None:
    """Make verl's platform (its device name and Ray resource key) this run's `device` ("cuda" | "cpu").
    verl resolves it on import from this process's own devices, so a driver on a GPU-less head node (a
    `ray job submit` target) resolves to our CPU platform, and every GPU bundle of its worker groups would
    become a CPU one: no GPU reserved, no CUDA_VISIBLE_DEVICES, every worker on cuda:0."""
    from verl.plugin.platform import get_platform, set_platform

    current = get_platform().device_name
    if current == device:
        return
    if device == "cuda":
        from verl.plugin.platform.platform_cuda import PlatformCUDA as Platform
    else:
        from flythinker_worker.platform import PlatformCPU as Platform
    logger.warning("verl resolved this process to platform %r; the run's workers use %r: switching", current, device)
    set_platform(Platform())


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
    Called inside a placement group (a Ray Tune trial: bundle 0 for the trial's driver, then one per
    worker, see recipe.sweep.trial_resources) the workers take bundles 1..n of it, so the trial's
    resources are its workers' and end with it. Release with `release_worker_group` (placement groups
    outlive their actors otherwise; one borrowed from a trial is left to its owner)."""
    match_verl_platform(device)
    trial_pg = ray.util.get_current_placement_group()
    if trial_pg is not None:
        pool = _trial_bundles(trial_pg, device, n_per_node, nnodes, colocate)
        prefix = f"pg{trial_pg.id.hex()[:8]}_{worker_cls.__name__}_"
    else:
        # max_colocate_count bounds the CPUs of a bundle: verl's default of 10 never fits a laptop.
        pool = RayResourcePool(process_on_nodes=[n_per_node] * nnodes, use_gpu=device == "cuda",
                               max_colocate_count=colocate)
        prefix = None
    return worker_group(pool, RayClassWithInitArgs(ray.remote(worker_cls), **init_args), device, prefix), pool


def worker_group(pool, worker: RayClassWithInitArgs, device: str, name_prefix: str | None = None) -> RayWorkerGroup:
    """verl's RayWorkerGroup whose MASTER_PORT lies outside the kernel's ephemeral ports (verl's default,
    a bind to port 0, can be taken by an outgoing connection before rank 0 binds it: see ports.py)."""
    return RayWorkerGroup(pool, worker, device_name=device, name_prefix=name_prefix,
                          master_port_range=master_port_range())


def _trial_bundles(pg, device: str, n_per_node: int, nnodes: int, colocate: int):
    """A verl resource pool over bundles 1..n of the placement group this process runs in; it never owns
    (or removes) that placement group."""
    from verl.single_controller.ray.base import SubRayResourcePool

    class TrialBundles(SubRayResourcePool):
        def get_placement_groups(self, strategy="STRICT_PACK", name=None, device_name="cuda"):
            return [pg]

    bundles = pg.bundle_specs
    if nnodes != 1 or len(bundles) != 1 + n_per_node or bundles[1].get("CPU", 0) < colocate:
        raise RuntimeError(f"the placement group {bundles} this process runs in does not fit {nnodes} x "
                           f"{n_per_node} workers x {colocate} processes (see recipe.sweep.trial_resources)")
    return TrialBundles(placement_groups=None, start_bundle_index=1, subgroup_world_size=n_per_node,
                        process_on_nodes=[1 + n_per_node], use_gpu=device == "cuda", max_colocate_count=colocate)


def release_worker_group(group: RayWorkerGroup, pool: RayResourcePool | None) -> None:
    """Kill the group's actors and free the pool's placement groups (when `pool` is given: its owner)."""
    for worker in group.workers:
        ray.kill(worker)
    for pg in (pool.pgs or []) if pool is not None else []:
        ray.util.remove_placement_group(pg)


def first_metrics(output: DataProto) -> dict:
    """Rank 0's metrics from a DP-collected DataProto (other ranks report None)."""
    return {k: v[0] if isinstance(v, list) else v for k, v in output.meta_info["metrics"].items()}
