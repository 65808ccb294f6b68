"""evaluation.trajectories against independent computations: known directions on constructed points, the
reasoner run directly for the collected latents, the CLI's files (point counts from the tokenised
references, s from the embedding table, explained variance from numpy's SVD of all users' latents) and its
error messages."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from flythinker_worker.model import FlyThinker
from evaluation.trajectories import NO_LATENTS, collect_latents, fit_directions, main, select_rows, tokenize_row
from conftest import make_pair


def _line_samples(angle_deg, rng, samples=4, n=40, step=0.1, noise=0.05):
    """Samples moving along `angle_deg` (token order), each from its own random start, with noise."""
    u = np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
    return [rng.normal(scale=3.0, size=2) + np.arange(n)[:, None] * step * u + rng.normal(scale=noise, size=(n, 2))
            for _ in range(samples)]


@pytest.mark.parametrize("fit", ["lsq", "pca"])
def test_fit_recovers_known_directions(fit):
    rng = np.random.default_rng(1)
    angles = {"a": 37.0, "b": -120.0, "c": 37.0 + 180.0}
    summary = fit_directions({u: _line_samples(a, rng) for u, a in angles.items()}, fit)
    by_user = {u["user_id"]: u for u in summary["users"]}
    for user, angle in angles.items():
        entry = by_user[user]
        got = np.asarray(entry["direction"])
        assert abs(np.linalg.norm(got) - 1) < 1e-12
        want = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        # oriented: the direction points the way the points move as the token position grows
        assert math.degrees(math.acos(np.clip(got @ want, -1, 1))) < 3.0
        assert entry["sample_consistency"] > 0.99 and entry["r2"] > 0.9
        assert abs(entry["speed"] - 0.1) < 0.01  # step per token along the line
        assert entry["n_points"] == 160
    # a and c move in opposite directions: their pairwise angle is ~180, and the three pairs average
    # to (157 + 180 + 23) / 3 = 120 degrees
    assert abs(summary["mean_pairwise_angle_deg"] - 120.0) < 3.0


def test_fit_without_motion_is_not_consistent():
    rng = np.random.default_rng(2)
    noise = [rng.normal(size=(50, 2)) for _ in range(6)]
    entry = fit_directions({"u": noise})["users"][0]
    assert entry["r2"] < 0.1 and entry["sample_consistency"] < 0.9


def _rows(assets, split="val"):
    return pd.read_parquet(assets / "product_review" / f"{split}.parquet")


def test_collected_latents_have_norm_s_and_match_the_reasoner(tiny_assets):
    generator, reasoner, tokenizer = make_pair()
    model = FlyThinker(generator, reasoner, lam=0.5)
    rows = select_rows(_rows(tiny_assets), users=2, samples_per_user=2)
    rescaled = collect_latents(model, tokenizer, rows, "rescaled")
    raw = collect_latents(model, tokenizer, rows, "raw")
    # s computed independently: mean L2 norm of the generator's embedding rows, in numpy float64
    table = generator.get_input_embeddings().weight.detach().double().numpy()
    s = np.sqrt((table ** 2).sum(axis=1)).mean()
    assert len(rescaled) == 2 and all(len(v) == 2 for v in rescaled.values())
    for row, (user, k) in zip(rows, [(u, k) for u in rescaled for k in range(2)]):
        got = rescaled[user][k]
        assert got.shape[1] == reasoner.config.hidden_size  # zero padding to d_G dropped
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), s, rtol=1e-5)
        # raw: the reasoner's final-norm states at the response positions, run directly
        prompt, response = tokenize_row(tokenizer, row, 2048, 1024)
        assert response[:-1] == tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            states = reasoner.model(torch.tensor([prompt + response])).last_hidden_state[0, len(prompt):]
        np.testing.assert_allclose(raw[user][k], states.numpy(), atol=1e-5)
        np.testing.assert_allclose(got, s * raw[user][k] / np.linalg.norm(raw[user][k], axis=1, keepdims=True),
                                   rtol=1e-4, atol=1e-6)


def table_scale(generator_table) -> float:
    """s = mean L2 norm of the generator's embedding rows, in numpy float64."""
    table = np.asarray(generator_table, dtype=np.float64)
    return float(np.sqrt((table ** 2).sum(axis=1)).mean())


@pytest.mark.slow  # two CLI runs (model load, t-SNE, plots): 11 s on 2 shared cores
def test_cli_writes_png_and_json_for_checkpoint_and_pair_folder(tiny_assets, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    generator, reasoner, tokenizer = make_pair()
    model = FlyThinker(generator, reasoner, lam=0.5)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    data = str(tiny_assets / "product_review" / "val.parquet")
    pair = tiny_assets / "tiny_models"
    tables = {"pca": generator.get_input_embeddings().weight.detach().numpy(),
              "tsne": load_file(pair / "generator" / "model.safetensors")["model.embed_tokens.weight"]}
    for folder, method, tok_dir in [(tmp_path / "ckpt", "pca", tmp_path / "ckpt"), (pair, "tsne", pair / "generator")]:
        out = tmp_path / f"out_{method}"
        main(["--model", str(folder), "--data", data, "--out", str(out), "--users", "2",
              "--samples-per-user", "2", "--method", method])
        assert (out / "trajectories.png").stat().st_size > 10_000
        report = json.loads((out / "trajectories.json").read_text())
        assert report["method"] == method and report["n_users"] == 2 and len(report["users"]) == 2
        # one point per response token: the reference's tokens + EOS, with the tokenizer the CLI loads
        cli_tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        rows = select_rows(_rows(tiny_assets), users=2, samples_per_user=2)
        for user in report["users"]:
            mine = [r for r in rows if str(r["user_id"]) == user["user_id"]]
            assert user["n_samples"] == len(mine) == 2
            assert user["n_points"] == sum(len(cli_tokenizer(r["reference"], add_special_tokens=False)["input_ids"]) + 1
                                           for r in mine)
            assert abs(np.linalg.norm(user["direction"]) - 1) < 1e-9
        s = table_scale(tables[method])
        assert report["scale_s"] == pytest.approx(s, rel=1e-5)
        assert report["latent_norm_mean"] == pytest.approx(s, rel=1e-4)
        if method == "tsne":
            assert report["explained_variance_ratio"] is None
        else:  # PCA of ALL users' rescaled latents jointly: explained variance from numpy's SVD of them
            latents = collect_latents(model, cli_tokenizer, rows, "rescaled")
            flat = np.concatenate([v for samples in latents.values() for v in samples]).astype(np.float64)
            sv = np.linalg.svd(flat - flat.mean(axis=0), compute_uv=False)
            np.testing.assert_allclose(report["explained_variance_ratio"], sv[:2] ** 2 / (sv ** 2).sum(), rtol=1e-4)


def test_errors_are_clear(tiny_assets, tmp_path, capsys):
    generator, _, tokenizer = make_pair()
    rows = select_rows(_rows(tiny_assets), users=1, samples_per_user=1)
    with pytest.raises(ValueError, match=NO_LATENTS):
        collect_latents(FlyThinker(generator, None, lam=0.5), tokenizer, rows)
    data = str(tiny_assets / "product_review" / "val.parquet")
    n_users = _rows(tiny_assets)["user_id"].nunique()
    base = ["--model", str(tiny_assets / "tiny_models"), "--data", data, "--out", str(tmp_path / "o")]
    for extra, message in [(["--users", str(n_users + 1)], f"only {n_users} distinct users"),
                           (["--lam", "0"], NO_LATENTS)]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
