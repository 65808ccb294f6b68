"""Checkpoint directories: atomic commit, torn ones never picked, pruning, metrics truncation."""

import errno
import json
import shutil

import pytest

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


def test_full_disk_is_refused_before_writing_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    make(tmp_path, 4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    wrote = []
    with pytest.raises(OSError, match=r"about 100\.0 MiB needed, 10\.0 MiB free") as err:
        checkpointing.write(tmp_path, 8, wrote.append, {"step": 8}, keep=None, needed_bytes=100 * 2**20)
    assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)
    assert "global_step_4 is intact" in str(err.value)
    assert wrote == []  # the workers were never asked to write
    assert checkpointing.latest(tmp_path) == tmp_path / "global_step_4"
    assert not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("RayTaskError: ... OSError: [Errno 28] No space left on device")])
def test_a_write_that_runs_out_of_space_is_removed_and_explained(tmp_path, failure):
    make(tmp_path, 4)

    def save_shards(tmp):  # a worker that wrote part of its shards, then hit a full disk
        (tmp / "shards").mkdir()
        (tmp / "shards" / "part0").write_bytes(b"x" * 1000)
        raise failure

    with pytest.raises(OSError, match="no space left on the device") as err:
        checkpointing.write(tmp_path, 8, save_shards, {"step": 8}, keep=None, needed_bytes=2**20)
    assert err.value.errno == errno.ENOSPC
    assert "checkpoint of step 8 abandoned" in str(err.value) and "MiB free" in str(err.value)
    assert not list(tmp_path.glob(".tmp_*")) and not (tmp_path / "global_step_8").exists()
    assert checkpointing.latest(tmp_path) == tmp_path / "global_step_4"
    assert (tmp_path / checkpointing.LATEST).read_text() == "4"


def test_resume_refuses_a_config_that_changes_what_is_trained(tmp_path):
    saved = {"optim": {"lr": 0.002, "betas": [0.9, 0.999]}, "trainer": {"seed": 1, "save_freq": 4},
             "data": {"train_files": ["a.parquet"], "val_files": []}, "val_generation": {"num_samples": 0}}
    path = checkpointing.write(tmp_path, 4, lambda tmp: None, {"step": 4}, keep=None, config=saved)
    same = json.loads(json.dumps(saved))
    assert checkpointing.check_resume(path, same) == {}
    bookkeeping = {**same, "trainer": {"seed": 1, "save_freq": 8}, "val_generation": {"num_samples": 4},
                   "data": {"train_files": ["a.parquet"], "val_files": ["v.parquet"]}}
    assert checkpointing.check_resume(path, bookkeeping) == {
        "trainer.save_freq": (4, 8), "val_generation.num_samples": (0, 4), "data.val_files": ([], ["v.parquet"])}
    changed = {**bookkeeping, "optim": {"lr": 1e-4, "betas": (0.9, 0.95)}, "trainer": {"seed": 2, "save_freq": 8}}
    with pytest.raises(ValueError) as err:
        checkpointing.check_resume(path, changed)
    message = str(err.value)
    assert "optim.lr: 0.002 -> 0.0001" in message and "optim.betas: [0.9, 0.999] -> [0.9, 0.95]" in message
    assert "trainer.seed: 1 -> 2" in message and "save_freq" not in message
    assert "trainer.experiment_name=NEW_NAME" in message


def test_only_other_runs_temp_dirs_are_stale(tmp_path):
    dead = tmp_path / f"{checkpointing.TEMP_PREFIX}8.999-deadbeef"
    dead.mkdir(parents=True)
    ours = checkpointing.begin(tmp_path, 12)
    assert ours.name.endswith(checkpointing.RUN_ID) and ours != dead
    assert checkpointing.remove_stale_temps(tmp_path) == [dead]
    assert ours.exists() and not dead.exists()
