"""bench.train at tiny sizes, 1 step, no timing assertions. Parameter counts and ideal ratios (in the JSON
and as printed) are checked against counts computed independently from the Qwen2 configs (closed-form
formula); the rates derived from the timings against their definitions. Every run writes its JSON under
tmp_path (the default, bench_results/train.json, is the user's real results file)."""

import json
import re

import pytest
import torch

from flythinker_worker.tiny import load_tiny_tokenizer, tiny_config
from bench.train import build, main, make_batch, train_step

TINY = ["--batch-size", "2", "--seq-len", "16", "--warmup", "0", "--steps", "1"]


def qwen2_counts(cfg) -> dict[str, int]:
    """bench.train.param_counts of a Qwen2ForCausalLM, from its config alone (closed-form formula)."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    attention = (d * heads * hd + heads * hd) + 2 * (d * kv * hd + kv * hd) + heads * hd * d  # q,k,v biased; o not
    layer = attention + 3 * d * inter + 2 * d  # SwiGLU MLP + two RMSNorms
    body = layers * layer + d  # + final norm
    table = cfg.vocab_size * d
    embedding = table if cfg.tie_word_embeddings else 2 * table
    return {"total": body + embedding, "embedding": embedding, "non_embedding": body, "head": table}


def expected_ideals(gen_cfg, rsn_cfg) -> dict[str, float]:
    """1 + N_R/N_G under the three conventions of bench.train's docstring (no projection: `pad`)."""
    g, r = qwen2_counts(gen_cfg), qwen2_counts(rsn_cfg)
    return {"non_embedding": 1 + r["non_embedding"] / g["non_embedding"],
            "with_embeddings": 1 + r["total"] / g["total"],
            "as_run": 1 + r["non_embedding"] / (g["non_embedding"] + g["head"])}


LABELS = {"non_embedding": "non-embedding params", "with_embeddings": "all params, embeddings counted",
          "as_run": "as run: reasoner body / generator body + LM head"}


def printed_ideals(out: str) -> dict[str, float]:
    by_label = {m.group(1): float(m.group(2))
                for m in re.finditer(r"ideal 1 \+ N_R/N_G \((.+?)\): ([0-9.]+)", out)}
    return {key: by_label[label] for key, label in LABELS.items() if label in by_label}


def check_against_configs(saved: dict, out: str, gen_cfg, rsn_cfg) -> None:
    """Parameter counts and ideal ratios, in the JSON and as printed, against the closed-form counts."""
    assert saved["params"]["generator"] == qwen2_counts(gen_cfg)
    assert saved["params"]["reasoner"] == qwen2_counts(rsn_cfg)
    want = expected_ideals(gen_cfg, rsn_cfg)
    assert saved["ideal"] == pytest.approx(want, rel=1e-12)
    assert printed_ideals(out) == pytest.approx(want, abs=1e-6)  # printed with 6 decimals


def test_tiny_default_counts_ideals_and_rates(capsys, tmp_path):
    main(TINY + ["--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "bench.json").read_text())
    vocab = len(load_tiny_tokenizer())
    gen_cfg, rsn_cfg = tiny_config("generator", vocab_size=vocab), tiny_config("reasoner", vocab_size=vocab)
    assert gen_cfg.tie_word_embeddings  # the tiny default: tied tables counted once
    check_against_configs(saved, out, gen_cfg, rsn_cfg)
    # timings are not predictable; what is derived from them follows from B=2, T=16 and the definitions
    ms = saved["median_ms"]
    assert saved["ratio"] == pytest.approx(ms["flythinker"] / ms["sft"])
    want = expected_ideals(gen_cfg, rsn_cfg)
    assert saved["quotient"] == pytest.approx({k: saved["ratio"] / v for k, v in want.items()})
    assert saved["tokens_per_s"] == pytest.approx({k: 2 * 16 / (v / 1e3) for k, v in ms.items()})
    assert re.search(r"^sft +median +[0-9.]+ ms/step", out, re.M)
    assert re.search(r"^flythinker +median +[0-9.]+ ms/step", out, re.M)


def test_config_only_folders_random_init_untied_head_and_vocab_mismatch(capsys, tmp_path):
    # an untied generator head and unequal vocab tables (as Qwen2.5 7B vs 1.5B) from config.json alone
    gen_cfg = tiny_config("generator", vocab_size=320, tie_word_embeddings=False)
    rsn_cfg = tiny_config("reasoner", vocab_size=256, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2)
    gen_cfg.save_pretrained(tmp_path / "g")
    rsn_cfg.save_pretrained(tmp_path / "r")
    main(TINY + ["--generator", str(tmp_path / "g"), "--reasoner", str(tmp_path / "r"),
                 "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert "random init from config.json" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    check_against_configs(saved, out, gen_cfg, rsn_cfg)
    assert saved["params"]["generator"]["embedding"] == 2 * 320 * 64  # input table + untied head


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


def test_gpu_train_check_runs_on_cpu_and_writes_its_default_json(tmp_path):
    """bench.gpu_train_check's CPU smoke form end to end (gloo, world size 1, fp32), run from another folder
    without --json: the accuracy gates hold and the report lands at the default path."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "bench.gpu_train_check", "--device", "cpu", "--preset", "tiny",
                    "--length-scale", "0.05", "--rows", "4", "--budget", "1024", "--steps", "1", "--warmup", "0",
                    "--skip", "compiled"], check=True, cwd=tmp_path, env=env, timeout=600)
    report = json.loads((tmp_path / "bench_results" / "gpu_train_check.json").read_text())
    acc = report["accuracy"]
    assert acc["ok"] and acc["packed_vs_padded_fp32"] < 1e-4
    assert set(report["variants"]) == {"padded_mb4_full", "packed_full", "packed_selective", "sft_packed_selective"}
    assert report["summary"]["flop_ideal"] > 1.0
