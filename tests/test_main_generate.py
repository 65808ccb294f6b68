"""evaluation.main_generate / launch/generate.sh: ONE run, interrupted (a torn last line) and resumed with
other batching, whose every field equals decoding done here (own chat templating, own crc32 seeds);
refusing to resume with other settings, strict config, and the generator-only baseline against
transformers' own greedy `generate`."""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO
from test_rollout_worker import varied_pair, write_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from flythinker_worker import FlyThinker, PairedDecoder
from evaluation.main_generate import load_generate_config, run

FIELDS = {"id", "user_id", "task", "prompt", "prediction", "reference", "n_tokens", "seconds"}
ROWS, MAX_NEW, SEED = 6, 16, 3
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
       "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def overrides(model, data, out, *extra):
    return [f"model.path={model}", f"data.files=[{data}]", f"data.max_rows={ROWS}", f"output.path={out}",
            "generation.batch_size=2", f"generation.max_new_tokens={MAX_NEW}", f"generation.seed={SEED}", *extra]


def compose_generate(args):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        return compose(config_name="flythinker_generate", overrides=list(args))


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("generate") / "ckpt")


@pytest.fixture(scope="module")
def setup(ckpt, tiny_assets, ray_local, tmp_path_factory):
    """ONE predictions file made the way users hit every path: launch/generate.sh stops after 2 batches
    (4 rows), the 4th line is torn as by a crash mid-write, then the run resumes with other batching and
    worker count. The tests check this file against decoding done here, row by row."""
    data = tiny_assets / "product_review" / "test.parquet"
    out = tmp_path_factory.mktemp("generate_out") / "predictions.jsonl"
    proc = subprocess.run(["bash", "launch/generate.sh", *overrides(ckpt, data, out, "generation.max_batches=2")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read(out)) == 4
    # A crash in the middle of writing the 4th line: 3 whole lines and a torn one.
    text = out.read_bytes()
    cut = text.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(text[:cut + (len(text) - cut) // 2])
    # Resume with other batching and worker count: per-row seeds keep every row's sample.
    run(compose_generate(overrides(ckpt, data, out, "generation.batch_size=3", "trainer.n_gpus_per_node=1")))
    return ckpt, data, out


@pytest.mark.slow
def test_interrupted_and_resumed_run_writes_every_field(setup):
    """Every row once, in input order, each field equal to an uninterrupted decode of that row alone."""
    ckpt, data, out = setup
    records = read(out)
    frame = pd.read_parquet(data).head(ROWS)
    assert [r["id"] for r in records] == frame["id"].tolist()  # no duplicates, none missing
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    decoder = PairedDecoder(FlyThinker.from_pretrained(ckpt).eval())
    for record, (_, row) in zip(records, frame.iterrows()):
        assert set(record) == FIELDS
        messages = [dict(m) for m in row["prompt"]]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = decoder.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               seed=[zlib.crc32(f"{SEED}:{row['id']}".encode())])
        generated = out.sequences[0, len(ids):len(ids) + int(out.num_generated[0])].tolist()
        assert record["prediction"] == tokenizer.decode(generated, skip_special_tokens=True)
        assert record["n_tokens"] == len(generated)
        assert record["prompt"] == messages[-1]["content"] and messages[-1]["role"] == "user"
        assert (record["reference"], record["user_id"], record["task"]) == (row["reference"], row["user_id"],
                                                                           row["task"])
        assert record["seconds"] > 0
    assert len({r["prediction"] for r in records}) == ROWS  # rows really differ


@pytest.mark.slow
def test_complete_file_is_left_alone_and_other_settings_are_refused(setup, tmp_path):
    ckpt, data, whole = setup
    out = tmp_path / "copy.jsonl"
    for suffix in ("", ".meta.json"):
        shutil.copy(str(whole) + suffix, str(out) + suffix)
    before = out.read_bytes()
    run(compose_generate(overrides(ckpt, data, out)))  # nothing to do: no worker group is even started
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="other settings.*temperature"):
        run(compose_generate(overrides(ckpt, data, out, "generation.temperature=0")))
    assert out.read_bytes() == before


@pytest.mark.parametrize("bad, message", [
    ("generation.temperature=-1", "generation.temperature"),
    ("generation.top_p=0", "generation.top_p"),
    ("trainer.device=tpu", "trainer.device"),
    ("model.dtype=fp16", "model.dtype"),
    ("data.files=[]", "data.files"),
    ("model.fusion={lam:0.5}", "model.reasoner_path"),
    ("+generation.tempreature=1", "unknown config key 'generation.tempreature'"),
])
def test_bad_config_is_a_clear_error(tmp_path, bad, message):
    args = overrides(tmp_path / "generator", "x.parquet", tmp_path / "o.jsonl", bad)
    with pytest.raises(ValueError, match=message):
        load_generate_config(compose_generate(args))


@pytest.mark.slow
def test_generator_only_baseline_equals_transformers_generate(ray_local, setup, tmp_path):
    """A plain HF generator folder runs alone (lam 0, no reasoner): greedy equals HF's own generate."""
    ckpt, data, _ = setup
    generator, _, tokenizer = varied_pair()
    folder = tmp_path / "plain_generator"
    generator.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "baseline.jsonl"
    shutil.copy(setup[2], out)  # another model's predictions: output.overwrite=true starts over
    shutil.copy(str(setup[2]) + ".meta.json", str(out) + ".meta.json")
    run(compose_generate(overrides(folder, data, out, "generation.temperature=0", "data.max_rows=3",
                                   "generation.batch_size=3", "output.overwrite=true")))  # 2 workers + a filler
    records = read(out)
    # AutoTokenizer, as the CLI loads it (on a folder with a qwen2 config.json it is Qwen2Tokenizer, whose
    # pre-tokenizer splits differently from the shipped tiny tokenizer object).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    for record, (_, row) in zip(records, pd.read_parquet(data).head(3).iterrows()):
        ids = torch.tensor([tokenizer.apply_chat_template([dict(m) for m in row["prompt"]],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        generated = expected[0, ids.shape[1]:].tolist()
        assert record["prediction"] == tokenizer.decode(generated, skip_special_tokens=True)
        assert record["n_tokens"] == len(generated)
    assert len(records) == 3


def test_generator_only_of_a_checkpoint_drops_the_reasoner(ckpt):
    from flythinker_worker.rollout_worker import RolloutConfig, RolloutModelConfig, build_rollout_model

    model = build_rollout_model(RolloutConfig(RolloutModelConfig(path=str(ckpt), generator_only=True)))
    full = FlyThinker.from_pretrained(ckpt)
    assert model.reasoner is None and model.lam == 0.0 and full.lam == 0.5
    for name, value in full.generator.state_dict().items():
        assert torch.equal(model.generator.state_dict()[name], value), name
