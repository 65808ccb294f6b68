"""The rollout worker group (2 CPU workers) against in-process paired decoding of each row ALONE, and
weights synced in memory from a training group against the same training group's export on disk."""

import dataclasses

import pytest
import ray
import torch
from conftest import compose, tiny_overrides
from transformers import AutoTokenizer
from verl import DataProto
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool

from flythinker_worker import FlyThinker, PairedDecoder
from flythinker_worker.fsdp_worker import FlyThinkerTrainWorker
from flythinker_worker.ports import FIRST_PORT, ephemeral_range
from flythinker_worker.rollout_worker import RolloutConfig, RolloutDecodingConfig, RolloutModelConfig
from flythinker_worker.tiny import tiny_pair
from recipe.config import load_config
from recipe.data import SFTDataset
from recipe.rollout import (make_rollout_group, rollout_config_from_training,
                               sync_weights)
from recipe.workers import release_worker_group, worker_group

pytestmark = pytest.mark.slow
MAX_NEW = 24
SAMPLING = {"sampling": dict(temperature=0.8, top_p=0.95, top_k=0), "greedy": dict(temperature=0.0, top_p=1.0,
                                                                                     top_k=0)}
SEEDS = [11, 2**31 + 5, 7, 123456, 99]


def prompts(tokenizer, n=5):
    """Chat prompts of different lengths (so left padding differs by row), tokenised here directly."""
    texts = ["Write a short review.", "Rate this sleeping bag made of down fill, with a zipper.", "Hello",
             "A tent that survived a storm, and the zipper held up; summary: solid.", "Verdict?"][:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def alone(model, prompt_ids, seeds, eos, pad, backend="auto", **sampling):
    """Reference: each row decoded on its own (batch of 1, no padding), in this process."""
    decoder, out = PairedDecoder(model.eval(), backend=backend), []
    for ids, seed in zip(prompt_ids, seeds):
        res = decoder.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=pad,
                               seed=[seed], **sampling)
        out.append(res.sequences[0, len(ids):len(ids) + int(res.num_generated[0])].tolist())
    return out


def group_generate(group, prompt_ids, seeds, eos, pad, **sampling):
    """Through the worker group, with the batch built here by hand (left padding, seed column)."""
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = group.generate(DataProto.from_dict(
        {"input_ids": ids, "attention_mask": mask, "seed": torch.tensor(seeds)},
        meta_info=dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=pad, **sampling)))
    return out


def rows(out):
    lengths = out.batch["response_length"].tolist()
    return [out.batch["responses"][i, :n].tolist() for i, n in enumerate(lengths)]


def varied_pair():
    """Tiny (generator, reasoner, tokenizer) whose greedy outputs vary: with tied embeddings a random
    model's argmax is mostly its input token, so greedy would repeat one token forever."""
    return tiny_pair(0, generator_overrides=dict(initializer_range=0.3, tie_word_embeddings=False),
                     reasoner_overrides=dict(initializer_range=0.3))


def write_checkpoint(path, lam=0.5):
    """A FlyThinker checkpoint (d_R < d_G pad fusion) as FlyThinker.save_pretrained writes it."""
    generator, reasoner, tokenizer = varied_pair()
    FlyThinker(generator, reasoner, lam=lam).save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "flythinker")


@pytest.fixture(scope="module")
def ckpt_group(ray_local, checkpoint):
    group, pool = make_rollout_group(RolloutConfig(model=RolloutModelConfig(path=str(checkpoint))), 2)
    yield group
    release_worker_group(group, pool)


@pytest.mark.parametrize("mode", ["sampling", "greedy"])
def test_group_equals_in_process_decoding_row_by_row(ckpt_group, checkpoint, mode):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt_ids, pad = prompts(tokenizer), tokenizer.pad_token_id
    model = FlyThinker.from_pretrained(checkpoint)
    # An extra EOS id that this model actually emits makes rows stop at different lengths.
    first = alone(model, prompt_ids, SEEDS, [tokenizer.eos_token_id], pad, **SAMPLING[mode])

    def stops(t):  # where each row would end if t were an EOS id
        return [r.index(t) + 1 if t in r else MAX_NEW for r in first]

    stop = next(t for r in first for t in r if len(set(stops(t))) > 1 and max(stops(t)) == MAX_NEW)
    eos = [tokenizer.eos_token_id, stop]
    expected = alone(model, prompt_ids, SEEDS, eos, pad, **SAMPLING[mode])
    assert len({len(r) for r in expected}) > 1 and max(map(len, expected)) == MAX_NEW

    out = group_generate(ckpt_group, prompt_ids[:4], SEEDS[:4], eos, pad, **SAMPLING[mode])  # 2 rows per worker
    assert out.batch["responses"].shape == (4, MAX_NEW)
    assert rows(out) == expected[:4]
    for i, n in enumerate(out.batch["response_length"].tolist()):
        assert (out.batch["responses"][i, n:] == pad).all()
    assert out.meta_info["metrics"]["rank"] == [0, 1] and out.meta_info["metrics"]["rows"] == [2, 2]


def test_driver_helpers_pad_to_the_worker_count_and_keep_row_seeds(ckpt_group, checkpoint):
    """recipe.rollout: 5 rows on 2 workers (a filler row), chat templating done by the helper."""
    from recipe.rollout import generate_texts

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [[{"role": "user", "content": t}] for t in ["Hello", "Write a review.", "Verdict?", "Tent", "Bag"]]
    sampling = type("S", (), dict(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95))()
    texts = generate_texts(ckpt_group, tokenizer, messages, sampling, SEEDS)
    prompt_ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
                  for m in messages]
    expected = alone(FlyThinker.from_pretrained(checkpoint), prompt_ids, SEEDS, [tokenizer.eos_token_id],
                     tokenizer.pad_token_id, temperature=0.8, top_p=0.95)
    assert texts == [tokenizer.decode(r, skip_special_tokens=True) for r in expected]
    # In batches of 2 (different padding and neighbours) the texts are the same.
    assert generate_texts(ckpt_group, tokenizer, messages, sampling, SEEDS, batch_size=2) == texts


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_continuous_batching_in_the_worker_equals_rows_alone(ray_local, checkpoint, backend):
    """One worker, 2 cache slots, 5 rows that stop at different lengths: finished rows free their slot for
    the next prompt (backend static) or rows go in padded batches of 2 (hf); each row is as if alone."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt_ids, pad = prompts(tokenizer), tokenizer.pad_token_id
    model = FlyThinker.from_pretrained(checkpoint)
    first = alone(model, prompt_ids, SEEDS, [tokenizer.eos_token_id], pad, backend, **SAMPLING["sampling"])
    eos = [tokenizer.eos_token_id] + [r[len(r) // 3] for r in first if len(r) > 3][:2]
    expected = alone(model, prompt_ids, SEEDS, eos, pad, backend, **SAMPLING["sampling"])
    assert len({len(r) for r in expected}) > 1
    cfg = RolloutConfig(model=RolloutModelConfig(path=str(checkpoint)),
                        decoding=RolloutDecodingConfig(backend=backend, slots=2))
    group, pool = make_rollout_group(cfg, 1)
    try:
        out = group_generate(group, prompt_ids, SEEDS, eos, pad, **SAMPLING["sampling"])
    finally:
        release_worker_group(group, pool)
    assert rows(out) == expected


def test_decoding_config_is_checked(checkpoint):
    model = RolloutModelConfig(path=str(checkpoint))
    for bad, match in ((dict(backend="fast"), "decoding.backend"), (dict(engine="sglang"), "decoding.engine"),
                       (dict(slots=-1), "decoding.slots"), (dict(vllm_gpu_memory_utilization=0), "vllm_gpu")):
        with pytest.raises(ValueError, match=match):
            RolloutConfig(model=model, decoding=RolloutDecodingConfig(**bad))
    with pytest.raises(ValueError, match="vllm needs"):
        RolloutConfig(model=model, decoding=dict(engine="vllm"))


def test_load_weights_is_strict(ckpt_group):
    with pytest.raises(Exception, match="missing"):  # a one-bucket sync that leaves weights out
        ckpt_group.load_weight_bucket({"generator.model.embed_tokens.weight": torch.zeros(2048, 64)}, 0, 1)


def test_weights_synced_from_training_equal_its_export(ray_local, tiny_assets, tmp_path):
    cfg = load_config(compose(tiny_overrides(
        tiny_assets, tmp_path, "data.train_batch_size=4", "data.micro_batch_size_per_gpu=1", "optim.lr=1e-2",
        "optim.warmup_ratio=0.0")))
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tiny_models/generator")
    data = SFTDataset(cfg.data.train_files, tokenizer, 512, 192)
    prompt_ids, eos, pad = prompts(tokenizer, 4), [tokenizer.eos_token_id], tokenizer.pad_token_id
    # The layout for GPUs: the rollout workers share the training group's bundles (max_colocate_count=2).
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=2)
    train = worker_group(pool, RayClassWithInitArgs(ray.remote(FlyThinkerTrainWorker),
                                                    config=cfg.worker_config(10)), "cpu")
    rollout = None
    try:
        # The store's port lies between Ray's worker ports and the kernel's ephemeral ones (CI once lost a
        # port bound to 0 to an actor's outgoing connection before rank 0 bound its store).
        assert FIRST_PORT <= int(train.master_port) < ephemeral_range()[0]
        train.init_model()
        # The API the trainer uses: a rollout group shaped like the training model, synced in memory, with
        # its weights parked on the host between calls as on GPUs (on CPU the moves are no-ops, but the
        # weights sync into the parked copy and the decoder is rebuilt after every call).
        rollout_cfg = rollout_config_from_training(cfg)
        assert not rollout_cfg.park_weights  # cpu; on cuda it parks
        rollout, own_pool = make_rollout_group(dataclasses.replace(rollout_cfg, park_weights=True), 2,
                                               resource_pool=pool)
        assert own_pool is None
        before = rows(group_generate(rollout, prompt_ids, SEEDS[:4], eos, pad, **SAMPLING["greedy"]))
        for begin in (0, 4):
            train.train_batch(DataProto.from_dict(dict(data.collate(list(range(begin, begin + 4))))))
        # A bucket of 0.05 MiB streams the ~1 MiB tiny pair in many pieces; every weight arrives once.
        loaded = sync_weights(train, rollout, bucket_mb=0.05)
        assert train.weight_bucket_count(0.05, "fp32")[0] > 5
        synced = {mode: rows(group_generate(rollout, prompt_ids, SEEDS[:4], eos, pad, **SAMPLING[mode]))
                  for mode in SAMPLING}
        train.export_model(str(tmp_path / "export"))
    finally:
        if rollout is not None:
            release_worker_group(rollout, None)
        release_worker_group(train, pool)

    exported = FlyThinker.from_pretrained(tmp_path / "export")
    assert loaded == len(exported.state_dict())  # every weight arrived, once
    for mode, got in synced.items():
        assert got == alone(exported, prompt_ids, SEEDS[:4], eos, pad, **SAMPLING[mode]), mode
    assert synced["greedy"] != before  # two steps at lr 1e-2 changed the model's greedy outputs
