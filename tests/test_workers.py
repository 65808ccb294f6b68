"""recipe.workers: verl's platform follows the run's device, whatever devices the driver process has."""

import pytest


@pytest.mark.parametrize("device, resource", [("cuda", "GPU"), ("cpu", "CPU")])
def test_worker_groups_use_the_runs_device_whatever_the_drivers_platform(device, resource):
    """A driver on a GPU-less head node resolves verl's platform to CPU on import; the pools of a
    trainer.device=cuda run must still ask Ray for GPUs (verl's RayResourcePool puts the platform's
    ray_resource_name() into every bundle). And a CPU run on a GPU node asks for CPUs."""
    from verl.plugin.platform import get_platform, set_platform
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    from flythinker_worker.platform import PlatformCPU
    from recipe.workers import match_verl_platform

    original = get_platform()
    try:
        set_platform(PlatformCPU() if device == "cuda" else PlatformCUDA())  # the other one
        match_verl_platform(device)
        assert get_platform().device_name == device
        assert get_platform().ray_resource_name() == resource
    finally:
        set_platform(original)
