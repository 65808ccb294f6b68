"""Build a FlyThinker from two HF model folders (or a FlyThinker checkpoint), refusing pairs that do not
share a tokenizer: whole in one process (`load_flythinker`), or with its parameters on the meta device
plus a reader of the weight files for rank 0 (`build_on_meta`; the distributed init in sharding.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .model import CONFIG_NAME, PROJECTION_WEIGHTS, FlyThinker, check_checkpoint, stored_reasoner

logger = logging.getLogger(__name__)


def check_same_vocabulary(generator_tokenizer, reasoner_tokenizer) -> None:
    """Both models read the same token ids: their tokenizers must map every token to the same id."""
    gen_vocab, rsn_vocab = generator_tokenizer.get_vocab(), reasoner_tokenizer.get_vocab()
    if gen_vocab != rsn_vocab:
        only_gen = len(set(gen_vocab.items()) - set(rsn_vocab.items()))
        only_rsn = len(set(rsn_vocab.items()) - set(gen_vocab.items()))
        raise ValueError(
            f"vocabulary mismatch: generator tokenizer ({len(gen_vocab)} tokens) and reasoner tokenizer "
            f"({len(rsn_vocab)} tokens) differ in {only_gen}/{only_rsn} (token, id) pairs; FlyThinker feeds "
            "the same ids to both models, so pick a reasoner from the generator's model family")


def load_flythinker(generator_path: str, reasoner_path: str | None, lam: float, positions: str,
                    projection: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    trust_remote_code: bool = False):
    """(FlyThinker, tokenizer). `generator_path` may also be a FlyThinker checkpoint folder, whose stored
    weights (and projection) are loaded while `lam`/`positions`/`projection` come from the arguments."""
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    tokenizer, generator_dir, reasoner_dir, projection_file = resolve_sources(generator_path, reasoner_path, lam,
                                                                              trust_remote_code)
    generator = AutoModelForCausalLM.from_pretrained(generator_dir, **kwargs)
    reasoner = AutoModelForCausalLM.from_pretrained(reasoner_dir, **kwargs) if reasoner_dir else None
    model = FlyThinker(generator, reasoner, lam=lam, positions=positions, projection=projection,
                       vocab_size=len(tokenizer))
    if model.projection is not None and projection_file is not None:
        from safetensors.torch import load_file

        model.projection.load_state_dict(load_file(projection_file))
    return model, tokenizer


def resolve_sources(generator_path: str, reasoner_path: str | None, lam: float, trust_remote_code: bool = False):
    """(tokenizer, generator folder, reasoner folder or None, projection file or None) of a pair given as
    two HF folders or as a FlyThinker checkpoint folder (`generator_path`; its reasoner and projection are
    used, `reasoner_path` is ignored). The reasoner is left out when lam == 0 (SFT never runs it)."""
    tokenizer = AutoTokenizer.from_pretrained(generator_path, trust_remote_code=trust_remote_code)
    if os.path.exists(os.path.join(generator_path, CONFIG_NAME)):
        check_checkpoint(generator_path, tokenizer=True)
        with open(os.path.join(generator_path, CONFIG_NAME)) as f:
            stored = json.load(f)
        reasoner_dir = stored_reasoner(generator_path, stored) if lam else None
        projection_file = os.path.join(generator_path, PROJECTION_WEIGHTS)
        return tokenizer, os.path.join(generator_path, "generator"), str(reasoner_dir) if reasoner_dir else None, \
            projection_file if os.path.exists(projection_file) else None
    if lam == 0:
        return tokenizer, generator_path, None, None
    if not reasoner_path:
        raise ValueError("model.reasoner.path is required when fusion.lam != 0")
    check_same_vocabulary(tokenizer, AutoTokenizer.from_pretrained(reasoner_path, trust_remote_code=trust_remote_code))
    return tokenizer, generator_path, reasoner_path, None


# ---- rank-0 loading: the pair built on meta, weights read one unit at a time ---------------------------------

@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created inside land on the meta device (no memory, no init cost); buffers stay real:
    rotary `inv_freq` is computed at construction and is in no checkpoint. A parameter already on meta is
    kept as is, so tied weights (lm_head = embed_tokens) stay one object."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class WeightReader:
    """Full tensors of a pair's checkpoint files by FlyThinker key ("generator.model.layers.0...."), read
    on request (safetensors: only the requested tensors; every file is closed after each read, so no
    mapped pages stay resident), in their stored dtype (the shard copy converts). Keys absent from every
    file but given in `initial` (the projection's pad-map init) come from there."""

    def __init__(self, sources: dict[str, str], initial: dict[str, torch.Tensor] | None = None):
        self.sources, self.initial = sources, dict(initial or {})
        self._index = None

    def index(self) -> dict[str, tuple[str, str, tuple]]:
        """FlyThinker key -> (file, key in file, shape); built on first use (rank 0 only; headers only)."""
        if self._index is None:
            from safetensors import safe_open

            self._index = {}
            for prefix, folder in self.sources.items():
                for file in _weight_files(folder):
                    with safe_open(file, framework="pt") as f:
                        for key in f.keys():
                            self._index[prefix + key] = (file, key, tuple(f.get_slice(key).get_shape()))
        return self._index

    def check(self, shapes: dict[str, tuple]) -> None:
        """KeyError naming the missing keys, ValueError naming the tensors whose stored shape differs."""
        missing = [k for k in shapes if k not in self.index() and k not in self.initial]
        if missing:
            raise KeyError(f"{len(missing)} weights not in {sorted(set(self.sources.values()))}: {missing[:8]}")
        stored = {k: self.index()[k][2] if k in self.index() else tuple(self.initial[k].shape) for k in shapes}
        wrong = [f"{k}: stored {stored[k]}, model {tuple(v)}" for k, v in shapes.items() if stored[k] != tuple(v)]
        if wrong:
            raise ValueError(f"{len(wrong)} weights have another shape than the model's config: {wrong[:4]}")

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor, read without loading the rest (a safetensors slice)."""
        if key not in self.index():
            return self.initial[key][start:stop]
        from safetensors import safe_open

        file, name, _ = self.index()[key]
        with safe_open(file, framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def __call__(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out, by_file = {}, {}
        for key in keys:
            if key in self.index():
                by_file.setdefault(self.index()[key][0], []).append(key)
            else:
                out[key] = self.initial[key]
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in file_keys:
                    out[key] = f.get_tensor(self.index()[key][1])
        return out


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of a local model folder or, when `folder` is a hub id (`owner/name`, accepted at
    start-up only with hub access on), of its snapshot, downloaded here: only rank 0 reads weights, so only
    it fetches them (configs and tokenizers elsewhere come through from_pretrained)."""
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        logger.info("fetching the safetensors weights of %s from the hub (the HF cache keeps them)", folder)
        folder = snapshot_download(folder, allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{folder} holds no safetensors weights (model.safetensors[.index.json]); "
                            "convert .bin checkpoints with save_pretrained(safe_serialization=True)")


def build_on_meta(generator_path: str, reasoner_path: str | None, lam: float, positions: str, projection: str,
                  dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                  trust_remote_code: bool = False):
    """(model with parameters on meta, tokenizer, WeightReader for rank 0): the same pair `load_flythinker`
    builds (HF folders, or a FlyThinker checkpoint whose stored weights and projection are used), from
    configs alone. Reads no weights: materialise after sharding and fill with `rank0_load.load_from_rank0`."""
    tokenizer, generator_dir, reasoner_dir, projection_file = resolve_sources(generator_path, reasoner_path, lam,
                                                                              trust_remote_code)

    def empty_lm(folder):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                    trust_remote_code=trust_remote_code)

    generator = empty_lm(generator_dir)
    reasoner = empty_lm(reasoner_dir) if reasoner_dir else None
    model = FlyThinker(generator, reasoner, lam=lam, positions=positions, projection=projection,
                       vocab_size=len(tokenizer))
    sources = {"generator.": generator_dir, **({"reasoner.": reasoner_dir} if reasoner is not None else {})}
    initial = {}
    if model.projection is not None:
        if projection_file is not None:
            from safetensors.torch import load_file

            initial = {f"projection.{k}": v for k, v in load_file(projection_file).items()}
        else:  # FlyThinker's init: the pad map (identity into the first d_R dims), zero bias
            d_g, d_r = model.projection.weight.shape
            initial = {"projection.weight": torch.eye(d_g, d_r, dtype=dtype),
                       "projection.bias": torch.zeros(d_g, dtype=dtype)}
    return model, tokenizer, WeightReader(sources, initial)
