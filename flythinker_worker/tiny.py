"""Tiny offline preset: a byte-level BPE tokenizer with a Qwen-style chat template and a random-init
Qwen2-architecture Generator/Reasoner pair built from config. Nothing here downloads anything.

    python -m flythinker_worker.tiny --out data/tiny_models      # writes generator/ and reasoner/
    python -m flythinker_worker.tiny --size demo --seed 1 2 3 --out 'data/demo_models/seed{seed}'  # make demo
    python -m flythinker_worker.tiny --build-tokenizer CORPUS... # re-trains the shipped tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's layout: a default system turn when the conversation has none, `<|im_end|>` closes turns.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Sizes chosen so a training step takes well under a second on 2 CPU cores, while d_R < d_G
# exercises the paper's zero-pad fusion.
GENERATOR_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
REASONER_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
# `make demo` (launch/demo.sh): twice as wide, so that a few hundred steps on 2 CPU cores learn to write
# the synthetic reviews (~0.6M + 0.3M parameters besides the embeddings); still d_R < d_G (zero pad).
DEMO_GENERATOR_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
DEMO_REASONER_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1)
SIZES = {"tiny": {"generator": GENERATOR_SIZES, "reasoner": REASONER_SIZES},
         "demo": {"generator": DEMO_GENERATOR_SIZES, "reasoner": DEMO_REASONER_SIZES}}


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE on `texts` (deterministic for the same texts) with Qwen2's normaliser and
    pre-tokeniser, and wrap it as a Qwen2Tokenizer: AutoTokenizer then loads the very same tokenizer from
    the asset folder and from a Qwen2 model folder (it picks the class by model type there)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                      for m in bpe["merges"]],
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                          extra_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
                          model_max_length=8192, padding_side="left")


def load_tiny_tokenizer():
    """The tokenizer shipped with the package (assets/tiny_tokenizer), a small-vocabulary Qwen2Tokenizer."""
    from transformers import AutoTokenizer

    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(f"tiny tokenizer missing at {TOKENIZER_DIR}; rebuild it with "
                                "`python -m flythinker_worker.tiny --build-tokenizer CORPUS.jsonl`")
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_config(role: str, size: str = "tiny", **overrides) -> Qwen2Config:
    """Qwen2 config for the `generator` or `reasoner` of size preset `size` (tiny, demo); `overrides`
    (vocab_size, sizes, ...) win."""
    if size not in SIZES:
        raise ValueError(f"unknown size preset {size!r}; expected one of {', '.join(SIZES)}")
    sizes = SIZES[size][role]
    kwargs = dict(max_position_embeddings=4096, rope_theta=10000.0,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kwargs.update(sizes)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def tiny_pair(seed: int = 0, vocab_size: int | None = None, generator_overrides: dict | None = None,
              reasoner_overrides: dict | None = None, size: str = "tiny"):
    """Random-init (generator, reasoner, tokenizer) of size preset `size` (tiny, demo); same seed, same
    weights. Overrides are Qwen2Config fields, e.g. reasoner_overrides=dict(hidden_size=64) for d_R == d_G."""
    tokenizer = load_tiny_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    torch.manual_seed(seed)
    generator = Qwen2ForCausalLM(tiny_config("generator", size,
                                             **{"vocab_size": vocab_size, **(generator_overrides or {})}))
    torch.manual_seed(seed + 1)
    reasoner = Qwen2ForCausalLM(tiny_config("reasoner", size,
                                            **{"vocab_size": vocab_size, **(reasoner_overrides or {})}))
    for model in (generator, reasoner):
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval()
    return generator, reasoner, tokenizer


def write_tiny_pair(out: str | os.PathLike, seed: int = 0, size: str = "tiny") -> Path:
    """Materialise the pair as two HF folders (`out/generator`, `out/reasoner`), each with the tokenizer."""
    out = Path(out)
    generator, reasoner, tokenizer = tiny_pair(seed, size=size)
    for name, model in (("generator", generator), ("reasoner", reasoner)):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out


def _corpus(paths: list[str]) -> Iterable[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                yield record.get("input", "")
                yield record.get("output", "")
                for item in record.get("profile", []) or []:
                    yield " ".join(str(v) for v in item.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the tiny generator/ and reasoner/ folders here ('{seed}' in it "
                                      "is replaced by the seed; required with several seeds)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="init seed(s); one pair per seed (default 0)")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny",
                        help="tiny (default: tests, the embedded default) or demo (make demo)")
    parser.add_argument("--build-tokenizer", nargs="+", metavar="JSONL",
                        help="re-train the shipped tokenizer on LongLaMP-schema JSONL files")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    if not args.out and not args.build_tokenizer:
        parser.error("give --out and/or --build-tokenizer")
    if args.out and len(args.seed) > 1 and "{seed}" not in args.out:
        parser.error("several --seed values need '{seed}' in --out")
    if args.build_tokenizer:
        tokenizer = build_tiny_tokenizer(_corpus(args.build_tokenizer), args.vocab_size)
        tokenizer.save_pretrained(str(TOKENIZER_DIR))
        print(f"tokenizer ({len(tokenizer)} tokens) written to {TOKENIZER_DIR}")
    for seed in args.seed if args.out else []:
        out = write_tiny_pair(args.out.replace("{seed}", str(seed)), seed, args.size)
        print(f"{args.size} pair (seed {seed}) written to {out}")


if __name__ == "__main__":
    main()
