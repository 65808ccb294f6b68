"""Convert the FlyThinker authors' released checkpoint into our checkpoint layout, so our pipeline
(evaluation.main_generate, evaluation.report) can evaluate it.

    python -m evaluation.convert_authors --checkpoint pytorch_model.bin \
        --generator-config Qwen2.5-7B-Instruct/ --reasoner-config Qwen2.5-1.5B-Instruct/ --out OUT \
        [--lam 1.0 --positions global] [--tokenizer DIR] [--tag global_step123]

Their checkpoint is the state dict of one joint module: `Generator.<HF CausalLM keys>` (model.*, lm_head.*)
and `Reasoner.<HF CausalLM keys>`, optionally `projection.*` (a Linear(d_R, d_G), our `projection: linear`).
Any other top-level prefix is refused with the list of what was found: we do not guess their meaning.
`--checkpoint` may be a file (.bin/.pt through torch.load(weights_only=True), or .safetensors), a folder
holding pytorch_model.bin / model.safetensors, or a raw DeepSpeed ZeRO folder (`latest`, global_step*/),
which is consolidated by deepspeed's own zero_to_fp32 code (the optional `deepspeed` extra).
The configs (and the tokenizer, from --tokenizer or else the generator config folder) are the authors'
base models' HF folders: config.json is read, never their weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PARTS = {"Generator": "generator", "Reasoner": "reasoner", "projection": "projection", "Projection": "projection"}
WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.pt", "model.pt")
WRAPPER_KEYS = ("module", "state_dict", "model")  # DeepSpeed / Lightning style wrappers around a state dict


class ConversionError(ValueError):
    """The authors' checkpoint (or a config) cannot be converted; the message names the input."""


def _is_zero_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("global_step*"))
                              or any(path.glob("*zero_pp_rank_*")) or any(path.glob("*_model_states.pt")))


def consolidate_zero(folder: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """A full fp32 state dict from a raw ZeRO folder, by deepspeed's own consolidation."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ConversionError(
            f"{folder} is a raw DeepSpeed ZeRO checkpoint (sharded optimizer/model states); consolidating it "
            "needs deepspeed: pip install -e .[deepspeed] (or pip install deepspeed), or consolidate it "
            f"yourself with the script DeepSpeed saved beside it: python {folder}/zero_to_fp32.py {folder} "
            "pytorch_model.bin, then pass --checkpoint pytorch_model.bin") from None
    log.info("consolidating ZeRO shards in %s (tag %s) with deepspeed", folder, tag or "from 'latest'")
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ConversionError(f"{path} holds no state dict of tensors (found {found})")


def load_state_dict(path: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The authors' joint state dict from a file, a folder with one weights file, or a raw ZeRO folder."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"--checkpoint {path} does not exist")
    if path.is_dir():
        if _is_zero_folder(path):
            return consolidate_zero(path, tag)
        files = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
        if not files:
            raise ConversionError(f"{path} has none of {', '.join(WEIGHT_NAMES)} and is not a ZeRO folder")
        path = files[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only: a pickle from the internet may only rebuild tensors and plain containers.
        # mmap: a 7B+1.5B file is not read into memory twice; legacy (pre-zip) files cannot be mapped.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types; all mean "not a safe weights file"
        raise ConversionError(f"{path} cannot be loaded safely (torch.load weights_only=True): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return _unwrap(obj, path)


def split_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"generator": {...}, "reasoner": {...}, "projection": {...}} by top-level prefix; unknown prefixes
    are a ConversionError listing them."""
    parts: dict[str, dict[str, torch.Tensor]] = {"generator": {}, "reasoner": {}, "projection": {}}
    unknown: dict[str, int] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "module" and rest.partition(".")[0] in PARTS:  # DDP/DeepSpeed "module." wrapper
            head, _, rest = rest.partition(".")
        if head in PARTS and rest:
            parts[PARTS[head]][rest] = value
        else:
            unknown[head] = unknown.get(head, 0) + 1
    if unknown:
        listed = ", ".join(f"{k!r} ({n} keys)" for k, n in sorted(unknown.items()))
        raise ConversionError(f"unknown top-level prefixes in the checkpoint: {listed}; expected only "
                              "'Generator.', 'Reasoner.' and optionally 'projection.'")
    for name in ("generator", "reasoner"):
        if not parts[name]:
            raise ConversionError(f"the checkpoint has no '{name.capitalize()}.' keys")
    return parts


def build_model(config_dir: str | Path, weights: dict[str, torch.Tensor], role: str):
    """An HF CausalLM from `config_dir`'s config.json with exactly `weights` (no random init, no copy of
    the base model's weights): parameters start empty and take the checkpoint's tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dir = Path(config_dir)
    if not (config_dir / "config.json").is_file():
        raise ConversionError(f"--{role}-config {config_dir} has no config.json")
    config = AutoConfig.from_pretrained(str(config_dir))
    dtype = next((v.dtype for v in weights.values() if v.is_floating_point()), torch.float32)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches are raised even with strict=False
        raise ConversionError(f"'{role.capitalize()}.' weights do not fit {config_dir}/config.json: "
                              f"{str(err).strip()[:2000]}") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if result.unexpected_keys or missing:
        raise ConversionError(f"'{role.capitalize()}.' weights do not fit {config_dir}/config.json: "
                              f"missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ConversionError(f"'{role.capitalize()}.' weights leave parameters unset: {left[:8]}")
    return model.eval()


def convert(checkpoint: str | Path, generator_config: str | Path, reasoner_config: str | Path, out: str | Path,
            *, lam: float = 1.0, positions: str = "global", tokenizer: str | Path | None = None,
            tag: str | None = None) -> Path:
    """Convert the authors' checkpoint to our layout at `out` (FlyThinker.save_pretrained); returns `out`."""
    from flythinker_worker.model import FlyThinker

    parts = split_state_dict(load_state_dict(checkpoint, tag))
    generator = build_model(generator_config, parts["generator"], "generator")
    reasoner = build_model(reasoner_config, parts["reasoner"], "reasoner")
    projection = "linear" if parts["projection"] else "pad"
    tok = _load_tokenizer(tokenizer or generator_config, explicit=tokenizer is not None)
    model = FlyThinker(generator, reasoner, lam=lam, positions=positions, projection=projection,
                       vocab_size=len(tok) if tok is not None else None)
    if model.projection is not None:
        proj = {k: v.to(model.projection.weight.dtype) for k, v in parts["projection"].items()}
        try:
            model.projection.load_state_dict(proj)
        except RuntimeError as err:
            raise ConversionError(f"'projection.' weights do not fit Linear(d_R, d_G): {err}") from None
    model.save_pretrained(out, tokenizer=tok)
    log.info("wrote %s (lam %s, positions %s, projection %s)", out, lam, positions, projection)
    return Path(out)


def _load_tokenizer(path: str | Path, explicit: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - a config-only folder has no tokenizer: fine unless asked for
        if explicit:
            raise ConversionError(f"--tokenizer {path} cannot be loaded: {type(err).__name__}: {err}") from None
        log.warning("no tokenizer in %s (%s): the checkpoint is written without tokenizer files; "
                    "pass --tokenizer DIR to include them", path, type(err).__name__)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI; returns 0, or 2 with the reason on stderr."""
    ap = argparse.ArgumentParser(prog="python -m evaluation.convert_authors", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="authors' pytorch_model.bin, a folder with it, or a raw "
                                                        "ZeRO folder")
    ap.add_argument("--generator-config", required=True, help="HF folder with the generator's config.json")
    ap.add_argument("--reasoner-config", required=True, help="HF folder with the reasoner's config.json")
    ap.add_argument("--out", required=True, help="output checkpoint folder (our layout)")
    ap.add_argument("--lam", type=float, default=1.0, help="fusion weight lambda (default 1.0)")
    ap.add_argument("--positions", default="global", help="global | input_only | output_only (default global)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the generator config folder)")
    ap.add_argument("--tag", help="ZeRO tag (global_stepN) when --checkpoint is a raw ZeRO folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        convert(args.checkpoint, args.generator_config, args.reasoner_config, args.out, lam=args.lam,
                positions=args.positions, tokenizer=args.tokenizer, tag=args.tag)
    except (ConversionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
