"""Across-seed aggregation and the rule-based plain reading (evaluation.seeds)."""

import json
import math

import pytest

from evaluation import seeds


def test_mean_std_matches_hand_computation():
    # mean (17 + 18 + 19.3) / 3 = 18.1; deviations -1.1, -0.1, 1.2; squares 1.21 + 0.01 + 1.44 = 2.66;
    # sample variance 2.66 / 2 = 1.33; std sqrt(1.33) = 1.153256...
    mean, std = seeds.mean_std([17.0, 18.0, 19.3])
    assert mean == pytest.approx(18.1)
    assert std == pytest.approx(math.sqrt(1.33))
    assert seeds.mean_std([4.6]) == (4.6, None)
    assert seeds.mean_std([]) == (None, None)
    assert seeds.mean_std([2.0, 2.0]) == (2.0, 0.0)


def test_across_seeds_per_metric():
    per_seed = [{"rouge1": 10.0, "bleu": 1.0, "meteor": {"status": "skipped"},
                 "bertscore": {"status": "ok", "f1": 80.0}},
                {"rouge1": 14.0, "bleu": 3.0, "meteor": {"status": "skipped"},
                 "bertscore": {"status": "ok", "f1": 84.0}}]
    out = seeds.across_seeds(per_seed)
    assert out["rouge1"] == {"values": [10.0, 14.0], "mean": 12.0, "std": pytest.approx(math.sqrt(8.0))}
    assert out["bleu"]["mean"] == 2.0 and out["bleu"]["std"] == pytest.approx(math.sqrt(2.0))
    assert out["bertscore"]["mean"] == 82.0
    assert "meteor" not in out and "rougeL" not in out  # skipped / absent in the seeds: left out


def test_seed_deltas_broadcast_a_seed_independent_system():
    assert seeds.seed_deltas([3.0, 5.0], [1.0, 1.5]) == [2.0, 3.5]
    assert seeds.seed_deltas([3.0, 5.0, 4.0], [1.0]) == [2.0, 4.0, 3.0]
    with pytest.raises(ValueError, match="2 reference seeds but 3"):
        seeds.seed_deltas([1.0, 2.0], [1.0, 2.0, 3.0])


# The reading rules on constructed cases.
@pytest.mark.parametrize("delta, ci, p, deltas, code", [
    (1.2, (0.4, 2.0), 0.004, [1.0, 1.5, 0.9], "higher"),            # significant up, seeds agree
    (-1.2, (-2.0, -0.4), 0.004, [-1.0, -1.5, -0.9], "lower"),       # significant down, seeds agree
    (1.2, (-0.3, 2.7), 0.12, [1.0, 1.5, 0.9], "no_difference"),     # CI crosses 0
    (1.2, (0.0, 2.7), 0.04, [1.0, 1.5, 0.9], "no_difference"),      # CI touches 0: not excluded
    (1.2, (0.4, 2.0), 0.06, [1.0, 1.5, 0.9], "no_difference"),      # p above 0.05
    (1.2, (0.4, 2.0), 0.004, [2.5, 1.8, -0.6], "seeds_disagree"),   # rows significant, one seed disagrees
    (1.2, (0.4, 2.0), 0.004, [2.5, 0.0, 1.0], "seeds_disagree"),    # a tied seed does not agree
    (1.2, (0.4, 2.0), 0.004, [1.2], "one_seed"),                    # significant, one seed only
    (1.2, None, None, [1.0, 1.5], "untested"),                      # no bootstrap
])
def test_verdict_rules(delta, ci, p, deltas, code):
    got, text = seeds.verdict(delta, ci, p, deltas, "FlyThinker", "SFT")
    assert got == code
    if code in ("no_difference", "seeds_disagree", "untested"):
        assert "scores higher" not in text and "scores lower" not in text
    if code == "higher":
        assert text.startswith("FlyThinker scores higher than SFT") and "all 3 seeds agree" in text
    if code == "lower":
        assert text.startswith("FlyThinker scores lower than SFT")
    if code == "seeds_disagree":
        assert "favour FlyThinker" in text and "of 3" in text
    if code == "one_seed":
        assert "one seed" in text


def test_reading_line_is_generated_from_the_numbers():
    comp = {"delta": 1.2, "ci": [-0.3, 2.7], "p_value": 0.12}
    r = seeds.reading("FlyThinker", "SFT", "rouge1", comp, [18.0, 19.0, 17.3], [17.0, 16.0, 17.7])
    assert r["code"] == "no_difference"
    mean_f, std_f = seeds.mean_std([18.0, 19.0, 17.3])
    mean_s, std_s = seeds.mean_std([17.0, 16.0, 17.7])
    assert r["text"] == (f"FlyThinker vs SFT: ROUGE-1 +1.2 (95% CI [-0.3, +2.7], p=0.120; across seeds "
                         f"{mean_f:.1f}±{std_f:.1f} vs {mean_s:.1f}±{std_s:.1f}): no significant difference "
                         "at this scale.")
    one = seeds.reading("FlyThinker", "Non-pers", "rouge1", {"delta": 13.0, "ci": [11.0, 15.0], "p_value": 0.001},
                        [18.0, 19.0, 17.3], [4.6])
    assert one["code"] == "higher" and "vs 4.6 (one seed)" in one["text"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_pools_seeds_and_reads(tmp_path, capsys):
    refs = ["the kettle is sturdy and the lid is handy", "my drill has a solid grip and a good chuck",
            "this tent kept us dry in the rain all week", "the blender is loud but it crushes ice well"]

    def rows(preds):
        return [{"id": f"r{i}", "prediction": p, "reference": ref, "task": "product_review"}
                for i, (p, ref) in enumerate(zip(preds, refs))]

    good = [r.replace("the", "a") for r in refs]
    bad = ["words words words"] * 4
    files = {"FlyThinker": [_write(tmp_path / f"f{s}.jsonl", rows(good)) for s in (1, 2)],
             "SFT": [_write(tmp_path / f"s{s}.jsonl", rows(bad if s == 1 else good)) for s in (1, 2)],
             "Non-pers": [_write(tmp_path / "n.jsonl", rows(bad))]}
    argv = ["--seeds", "1", "2", "--out", str(tmp_path / "eval"), "--bertscore-model", "none", "--no-meteor",
            "--bootstrap", "200"]
    for name, fs in files.items():
        argv += ["--system", name, *fs]
    assert seeds.main(argv) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    fly, sft, non = (report["systems"][k] for k in ("FlyThinker", "SFT", "Non-pers"))
    assert fly["n"] == 8 and sft["n"] == 8 and non["n"] == 4
    assert fly["seeds"]["seeds"] == [1, 2] and non["seeds"]["seeds"] is None
    r1 = sft["seeds"]["metrics"]["rouge1"]
    assert r1["mean"] == pytest.approx(sum(r1["values"]) / 2) and r1["values"][0] < r1["values"][1]
    assert sft["rouge1"] == pytest.approx(r1["mean"])  # pooled row mean = mean of equal-sized seeds
    pairs = {p["system"]: p for p in report["comparisons"]["pairs"]}
    assert pairs["Non-pers"]["n"] == 8  # the seed-independent system stands in for both seeds
    assert report["reading"].startswith("FlyThinker vs SFT: ROUGE-1")
    # SFT equals FlyThinker on seed 2 (delta 0): whatever the rows say, the seeds do not agree.
    assert {r["other"]: r["code"] for r in report["readings"]}["SFT"] in ("seeds_disagree", "no_difference")
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "## Across seeds" in md and "one run" in md and "Readings" in md
    assert "Reading: FlyThinker vs SFT" in capsys.readouterr().out


def test_cli_rejects_wrong_file_counts(tmp_path, capsys):
    f = _write(tmp_path / "a.jsonl", [{"id": "1", "prediction": "a", "reference": "a"}])
    assert seeds.main(["--out", str(tmp_path / "o"), "--no-meteor", "--bertscore-model", "none",
                       "--system", "FlyThinker", f, f, f, "--system", "SFT", f, f]) == 2
    assert "2 files for 3 seeds" in capsys.readouterr().err
