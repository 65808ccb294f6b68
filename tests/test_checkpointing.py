"""Checkpoint directories: atomic commit, torn ones never picked, pruning, metrics truncation."""

import json

from recipe import checkpointing


def make(root, step, complete=True):
    tmp = checkpointing.begin(root, step)
    (tmp / "payload").write_text(str(step))
    if complete:
        return checkpointing.commit(root, tmp, step, {"step": step}, keep=None)
    return tmp


def test_latest_skips_torn_and_temporary_directories(tmp_path):
    assert checkpointing.latest(tmp_path) is None
    make(tmp_path, 4)
    make(tmp_path, 8)
    make(tmp_path, 12, complete=False)  # crashed while writing: only a temp dir
    torn = tmp_path / "global_step_16"  # a final name without the COMPLETE marker
    torn.mkdir()
    assert checkpointing.latest(tmp_path) == tmp_path / "global_step_8"
    (tmp_path / checkpointing.LATEST).write_text("16")  # pointer to the torn one
    assert checkpointing.latest(tmp_path) == tmp_path / "global_step_8"
    assert checkpointing.read_driver_state(tmp_path / "global_step_8") == {"step": 8}


def test_commit_prunes_beyond_keep(tmp_path):
    for step in (2, 4, 6):
        tmp = checkpointing.begin(tmp_path, step)
        checkpointing.commit(tmp_path, tmp, step, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("global_step_*")) == ["global_step_4", "global_step_6"]
    assert (tmp_path / checkpointing.LATEST).read_text() == "6"
    assert not list(tmp_path.glob(".tmp_*"))


def test_truncate_jsonl_drops_later_and_torn_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # killed mid-write
    checkpointing.truncate_jsonl(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
