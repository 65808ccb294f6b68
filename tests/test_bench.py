"""Smoke tests of bench.train: tiny sizes, 1 step, no timing assertions. The printed ideal ratios are
checked against parameter counts computed independently from the Qwen2 configs (closed-form formula)."""

import json
import re

import pytest
import torch

from flythinker_worker.tiny import load_tiny_tokenizer, tiny_config
from bench.train import build, main, make_batch, train_step

TINY = ["--batch-size", "2", "--seq-len", "16", "--warmup", "0", "--steps", "1"]


def qwen2_counts(cfg) -> tuple[int, int, int]:
    """(non-embedding, total, LM-head) parameters of a Qwen2ForCausalLM from its config alone."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    attention = (d * heads * hd + heads * hd) + 2 * (d * kv * hd + kv * hd) + heads * hd * d  # q,k,v biased; o not
    layer = attention + 3 * d * inter + 2 * d  # SwiGLU MLP + two RMSNorms
    body = layers * layer + d  # + final norm
    table = cfg.vocab_size * d
    return body, body + table + (0 if cfg.tie_word_embeddings else table), table


def expected_ideals(gen_cfg, rsn_cfg) -> dict[str, float]:
    (g_ne, g_all, g_head), (r_ne, r_all, _) = qwen2_counts(gen_cfg), qwen2_counts(rsn_cfg)
    return {"non-embedding params": 1 + r_ne / g_ne, "all params, embeddings counted": 1 + r_all / g_all,
            "as run: reasoner body / generator body + LM head": 1 + r_ne / (g_ne + g_head)}


def printed_ideals(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"ideal 1 \+ N_R/N_G \((.+?)\): ([0-9.]+)", out)}


def test_tiny_default_prints_ideal_from_config_counts(capsys, tmp_path):
    result = main(TINY + ["--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    vocab = len(load_tiny_tokenizer())
    want = expected_ideals(tiny_config("generator", vocab_size=vocab), tiny_config("reasoner", vocab_size=vocab))
    got = printed_ideals(out)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6)  # printed with 6 decimals
    assert re.search(r"^sft +median +[0-9.]+ ms/step", out, re.M)
    assert re.search(r"^flythinker +median +[0-9.]+ ms/step", out, re.M)
    ratio = float(re.search(r"measured ratio flythinker/sft: ([0-9.]+)", out).group(1))
    assert ratio == pytest.approx(result["ratio"], abs=1e-4)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["quotient"]["non_embedding"] == pytest.approx(saved["ratio"] / saved["ideal"]["non_embedding"])
    assert saved["tokens_per_s"]["sft"] == pytest.approx(2 * 16 / (saved["median_ms"]["sft"] / 1e3))


def test_config_only_folders_random_init_untied_head_and_vocab_mismatch(capsys, tmp_path):
    # an untied generator head and unequal vocab tables (as Qwen2.5 7B vs 1.5B) from config.json alone
    gen_cfg = tiny_config("generator", vocab_size=320, tie_word_embeddings=False)
    rsn_cfg = tiny_config("reasoner", vocab_size=256, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2)
    gen_cfg.save_pretrained(tmp_path / "g")
    rsn_cfg.save_pretrained(tmp_path / "r")
    result = main(TINY + ["--generator", str(tmp_path / "g"), "--reasoner", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "random init from config.json" in out
    for key, value in expected_ideals(gen_cfg, rsn_cfg).items():
        assert printed_ideals(out)[key] == pytest.approx(value, abs=1e-6)
    assert result["params"]["generator"]["embedding"] == 2 * 320 * 64  # input table + untied head


def test_sft_step_leaves_the_reasoner_untouched():
    class Args:
        generator = reasoner = None
        device, dtype, seed, lam, projection, gradient_checkpointing = "cpu", "fp32", 0, 0.5, "pad", False

    fly, sft, vocab, _ = build(Args)
    assert sft.generator is fly.generator and sft.reasoner is None
    optimizer = torch.optim.AdamW(fly.parameters(), lr=1e-3, weight_decay=0.025)
    before = {k: v.clone() for k, v in fly.reasoner.state_dict().items()}
    gen_before = fly.generator.model.norm.weight.clone()
    train_step(sft, optimizer, make_batch(2, 12, 6, vocab, 0, torch.device("cpu")), torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in fly.reasoner.state_dict().items())  # no decay either
    assert not torch.equal(gen_before, fly.generator.model.norm.weight)


@pytest.mark.parametrize("argv, message", [
    (["--generator", "/nowhere"], "give both --generator and --reasoner"),
    (["--lam", "0"], "--lam must be non-zero"),
    (["--generator", "/nowhere", "--reasoner", "/nowhere"], "not an HF model folder"),
    (["--seq-len", "4", "--prompt-len", "3"], "--prompt-len must leave"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
