"""A `cpu` platform for verl, so its device helpers, Ray placement and its own trainers
(`verl.trainer.sft_trainer` under torchrun, `verl.trainer.sft_trainer_ray`) work on CPU-only boxes
(laptops, CI) with gloo. Registered through the `verl.plugins` entry point (setup.cfg), which verl loads on
`import verl` in every process; verl picks it only when no accelerator platform probes as available.

Importing this module also arranges for the FlyThinker engine (`flythinker_worker.verl_engine`) to be
registered in verl's engine registry as soon as verl imports its engines (`verl.workers.engine`): verl's
trainers then find strategy `flythinker` without any code change, and processes that never build an engine
do not pay for importing one. The platform is registered here, before any engine module is imported
(verl's FSDP engine module resolves the platform at import time).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

logger = logging.getLogger(__name__)

ENGINE_MODULE = "flythinker_worker.verl_engine"


class CPUDeviceModule:
    """`torch.cpu` plus the `torch.cuda`-style calls verl makes on its device module (memory statistics,
    RNG state, caches, IPC), answered for the host: no device memory to report, one RNG (torch's)."""

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    # Memory: the host has no caching allocator with statistics; verl only logs these.
    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        """(free, total) bytes of host memory."""
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def ipc_collect() -> None:
        pass

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device=None) -> None:
        pass

    # RNG: the CPU generator is torch's default generator.
    @staticmethod
    def get_rng_state(device=None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device=None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"


def _gloo_backend(backend: Any) -> Any:
    """verl asks torch for `cpu:gloo,{device}:{backend}`, which on the CPU platform reads
    `cpu:gloo,cpu:gloo`: torch refuses a device named twice. Collapse such repeats (same device, same
    backend) to one entry; a string torch would accept is returned unchanged."""
    if not isinstance(backend, str) or "," not in backend:
        return backend
    pairs = {}
    for part in backend.split(","):
        device, _, name = part.strip().partition(":")
        if pairs.get(device, name) != name:
            return backend  # a real conflict: let torch report it
        pairs[device] = name
    return ",".join(f"{device}:{name}" for device, name in pairs.items())


def _install_gloo_backend_string() -> None:
    """Make torch.distributed.init_process_group accept verl's backend string on the CPU platform."""
    import torch.distributed as dist

    init = dist.init_process_group
    if getattr(init, "_flythinker_cpu", False):
        return

    @functools.wraps(init)
    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = _gloo_backend(kwargs["backend"])
        elif args:
            args = (_gloo_backend(args[0]), *args[1:])
        return init(*args, **kwargs)

    init_process_group._flythinker_cpu = True
    dist.init_process_group = init_process_group


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl platform for hosts without an accelerator: host memory, gloo, Ray's CPU resource."""

    _device_module = CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Probed after verl's own platforms: on a GPU node those answer first.
        return not torch.cuda.is_available() or os.environ.get("VERL_PLATFORM", "") == "cpu"

    def current_device(self) -> str:
        # verl moves tensors with `.to(get_device_id())`; an integer would mean cuda:N.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        # Asked for when verl builds its process-group backend string: make torch accept that string.
        _install_gloo_backend_string()
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


class _RegisterEngineAfterVerlEngines(importlib.abc.MetaPathFinder):
    """Imports `flythinker_worker.verl_engine` right after `verl.workers.engine` (verl's engine registry and
    built-in engines) has been imported, so the `flythinker` strategy is registered wherever verl can
    build an engine: torchrun ranks, Ray workers, drivers."""

    target = "verl.workers.engine"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)  # once; also keeps the lookup below from finding this finder
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _import_engine()

        spec.loader.exec_module = exec_then_register
        return spec


def _import_engine() -> None:
    try:
        importlib.import_module(ENGINE_MODULE)
    except Exception:  # verl must still import; selecting strategy=flythinker then names the problem
        logger.warning("could not register the FlyThinker verl engine", exc_info=True)


def _register_engine_lazily() -> None:
    if "verl.workers.engine" in sys.modules:
        _import_engine()
    elif not any(isinstance(f, _RegisterEngineAfterVerlEngines) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterEngineAfterVerlEngines())


if os.environ.get("FLYTHINKER_VERL_ENGINE", "1") != "0":
    _register_engine_lazily()


def register() -> None:
    """Entry-point target; importing this module already registered the platform (and the engine hook)."""
