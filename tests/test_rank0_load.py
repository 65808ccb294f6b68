"""rank0_load: rows of big tensors streamed from rank 0 land exactly on uneven shards (3 gloo ranks, a
2048-row table), shape mismatches are refused on every rank before any transfer, and the row split is
FSDP2's (torch.chunk). The 2-rank init and export checks live in test_sharding.py."""

import json
from pathlib import Path

import pytest
from test_sharding import _load_sharded, spawn

from flythinker_worker.rank0_load import row_bounds


def test_row_bounds_known_values():
    assert row_bounds(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert row_bounds(9, 4) == [(0, 3), (3, 6), (6, 9), (9, 9)]  # ceil(9/4) = 3 rows each: the last gets none
    assert row_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert row_bounds(2048, 3) == [(0, 683), (683, 1366), (1366, 2048)]


def _three_ranks(rank, world, root, bad_root, out):
    from flythinker_worker.sharding import full_state_dict

    def load(folder):  # stream_bytes=0: every row-sharded tensor streamed by rows
        return _load_sharded(f"{folder}/generator", f"{folder}/reasoner", "pad", stream_bytes=0)[0]

    model = load(root)
    table = model.generator.get_input_embeddings().weight
    state = full_state_dict(model)
    try:
        load(bad_root)
        error = None
    except RuntimeError as err:
        error = str(err)
    result = {"local_rows": table.to_local().shape[0], "error": error}
    if rank == 0:
        from flythinker_worker.loading import load_flythinker

        plain = load_flythinker(f"{root}/generator", f"{root}/reasoner", 0.5, "global", "pad")[0].state_dict()
        result["max_diff"] = max(float((state[k] - plain[k]).abs().max()) for k in plain)
        result["same_keys"] = set(state) == set(plain)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def three_rank_results(tmp_path_factory):
    from flythinker_worker.tiny import write_tiny_pair

    root, bad = tmp_path_factory.mktemp("pair"), tmp_path_factory.mktemp("bad")
    write_tiny_pair(root)
    write_tiny_pair(bad)
    config = json.loads((bad / "reasoner" / "config.json").read_text())
    config["intermediate_size"] += 8  # the files keep the old MLP shapes
    (bad / "reasoner" / "config.json").write_text(json.dumps(config))
    out = tmp_path_factory.mktemp("out")
    spawn(_three_ranks, 3, str(root), str(bad), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(3)]


def test_streamed_rows_on_uneven_shards_equal_a_plain_load(three_rank_results):
    assert [r["local_rows"] for r in three_rank_results] == [683, 683, 682]  # the tiny vocabulary: 2048 rows
    assert three_rank_results[0]["same_keys"] and three_rank_results[0]["max_diff"] == 0.0


def test_a_shape_mismatch_fails_on_every_rank_naming_the_tensor(three_rank_results):
    for r in three_rank_results:
        assert r["error"] is not None and "another shape" in r["error"] and "mlp" in r["error"], r["error"]
