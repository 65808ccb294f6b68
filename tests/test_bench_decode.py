"""bench.decode end to end at a tiny cell on CPU, no timing assertions: the JSON's ratios against their
definitions from the recorded times, and continuous batching's outputs equal to static batching's."""

import json

from bench.decode import main


def test_decode_bench_ratios_follow_their_definitions(tmp_path, capsys):
    out = tmp_path / "decode.json"
    result = main(["--batch-sizes", "2", "--new-tokens", "3", "--reps", "2", "--continuous", "--cb-prompts", "5",
                   "--cb-new-tokens", "6", "--cb-slots", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["grid"]
    best = {name: min(times) for name, times in row["times"].items()}
    assert set(best) == {"new", "today", "gen-new", "hf"} and all(len(t) == 2 for t in row["times"].values())
    for name, seconds in best.items():
        assert abs(row[f"{name}_tok_s"] - 2 * 3 / seconds) < 1e-9 * row[f"{name}_tok_s"]
    assert abs(row["new_over_today"] - best["today"] / best["new"]) < 1e-12
    assert abs(row["paired_over_gen"] - best["new"] / best["gen-new"]) < 1e-12
    assert abs(row["paired_over_gen_vs_ideal"] - row["paired_over_gen"] / row["ideal"]) < 1e-12
    t = row["times"]  # the median of two per-repetition ratios is their mean

    def mean_ratio(a, b):
        return (t[a][0] / t[b][0] + t[a][1] / t[b][1]) / 2

    assert abs(row["new_over_today_median"] - mean_ratio("today", "new")) < 1e-12
    assert abs(row["paired_over_gen_median"] - mean_ratio("new", "gen-new")) < 1e-12
    assert abs(row["new_bytes_per_s"] - (result["w_g"] + result["w_r"]) / (best["new"] / 3)) < 1e-6 * row["new_bytes_per_s"]
    cont = result["continuous"]
    assert cont["outputs_equal"] and len(cont["output_lengths"]) == 5
    assert abs(cont["ratio"] - min(cont["times"]["continuous"]) / min(cont["times"]["static"])) < 1e-12
    printed = capsys.readouterr().out
    assert f"new/today {row['new_over_today']:.2f}x" in printed and "outputs equal: True" in printed
