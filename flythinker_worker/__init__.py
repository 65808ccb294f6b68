"""FlyThinker worker package: the joint model, paired decoding, and (in submodules that import verl/ray)
the distributed workers. The names below load on first use (PEP 562), so importing a light submodule
(`flythinker_worker.utils`, `.tiny`) from data prep does not load the model and decoder; none of them
needs more than torch + transformers."""

from importlib import import_module

_EXPORTS = {"FlyThinker": "model", "FlyThinkerOutput": "model", "Positions": "model", "Projection": "model",
            "GenerateOutput": "decode_common", "PairedDecoder": "decoding", "sample_next": "sampling",
            "load_tiny_tokenizer": "tiny", "tiny_pair": "tiny"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
