"""make demo: its configs (seeded model pair, data, systems), the demo size preset, the demo data preset, and a
smoke run of launch/demo.sh (slow)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, compose

from data_prep.synthetic import generate_task, history_signal, make_users
from flythinker_worker.tiny import tiny_config
from recipe.config import load_config


@pytest.mark.parametrize("method", ["flythinker", "sft"])
def test_demo_pair_follows_the_seed(method):
    cfg = load_config(compose(["model_pair=demo", "task=synthetic_demo", f"method={method}", "trainer.seed=2",
                               f"trainer.experiment_name=demo_{method}"]))
    assert cfg.model.generator.path == "data/demo/models/seed2/generator"
    assert cfg.model.reasoner.path == ("data/demo/models/seed2/reasoner" if method == "flythinker" else "")
    assert cfg.trainer.default_local_dir == f"checkpoints/flythinker/demo_{method}/seed2"
    assert cfg.trainer.seed == 2 and cfg.trainer.device == "cpu" and cfg.data.val_files == []
    assert cfg.data.train_files == ["data/demo/product_review/train.parquet"]


@pytest.mark.parametrize("system", ["demo_non_pers", "demo_rag", "demo_sft", "demo_flythinker"])
def test_demo_systems_follow_the_seed(system):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from evaluation.main_generate import load_generate_config

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        cfg = load_generate_config(hydra_compose(config_name="flythinker_generate",
                                                 overrides=[f"+system={system}", "generation.seed=3"]))
    name = system.removeprefix("demo_")
    assert cfg.output.path == f"checkpoints/flythinker/demo/predictions/{name}_seed3.jsonl"
    assert "seed3" in cfg.model.path
    assert ("nohistory" in cfg.data.files[0]) == (name == "non_pers")
    assert cfg.model.generator_only == (name in ("non_pers", "rag"))


def test_demo_size_preset_leaves_tiny_alone():
    assert tiny_config("generator").hidden_size == 64 and tiny_config("reasoner").hidden_size == 32
    g, r = tiny_config("generator", "demo"), tiny_config("reasoner", "demo")
    assert (g.hidden_size, r.hidden_size) == (128, 64) and g.num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown size preset 'huge'"):
        tiny_config("generator", "huge")


def test_demo_data_puts_the_user_in_the_history():
    users = make_users("product_review", 12, preset="demo")
    assert all(u.opener and u.signature_rate == 1.0 for u in users)
    records = generate_task("product_review", users=12, records_per_user=3, preset="demo")["train"]
    by_id = {u.user_id: u for u in users}
    for record in records:
        user = by_id[record["reviewerId"]]
        # The user's opener and signature are in the response and in every history item, not in the query.
        for text in [record["output"]] + [item["reviewText"] for item in record["profile"]]:
            assert text.startswith(user.opener) and user.signature in text.lower()
        assert user.signature not in record["input"].lower()
    signal = history_signal("product_review", records)
    assert signal["own"] > signal["other"] + 5


@pytest.mark.slow
def test_demo_smoke_run(tmp_path):
    """launch/demo.sh end to end with tiny settings, in a copy of the repo (the real demo's outputs stay)."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("launch", "configs", "data_prep", "evaluation", "flythinker_worker", "recipe"):
        shutil.copytree(os.path.join(REPO, name), root / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "SEEDS": "1", "STEPS": "2", "SIZE": "tiny", "USERS": "18", "TEST_ROWS": "2",
           "MAX_NEW_TOKENS": "8", "BERTSCORE_MODEL": "none", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(root), "PYTHON": sys.executable,  # the suite's Python, activated or not
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(root / "launch" / "demo.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((root / "checkpoints/flythinker/demo/eval/metrics.json").read_text())
    assert list(report["systems"]) == ["Non-pers", "RAG", "SFT", "FlyThinker"] and report["seeds"] == [1]
    assert all(e["n"] == 2 for e in report["systems"].values())
    assert "Reading: FlyThinker vs SFT: ROUGE-1" in proc.stdout and "## Across seeds" in proc.stdout
    assert "wall time" in proc.stdout
    print(f"demo smoke run: {time.perf_counter() - start:.0f} s")
