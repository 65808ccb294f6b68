"""Loading checkpoints and model folders: an incomplete FlyThinker checkpoint names every missing file."""

import re

import pytest
import torch

from flythinker_worker import FlyThinker
from flythinker_worker.loading import load_flythinker
from flythinker_worker.model import missing_checkpoint_files


@pytest.fixture
def checkpoint(pair, tmp_path):
    generator, reasoner, tokenizer = pair
    FlyThinker(generator, reasoner, lam=0.5, projection="linear").save_pretrained(tmp_path / "ckpt", tokenizer)
    return tmp_path / "ckpt"


def test_a_complete_checkpoint_loads(checkpoint):
    assert missing_checkpoint_files(checkpoint, tokenizer=True) == []
    model, tokenizer = load_flythinker(str(checkpoint), None, 0.5, "global", "linear")
    assert model.projection is not None and tokenizer.eos_token_id is not None


def test_missing_files_are_named(checkpoint):
    (checkpoint / "generator" / "model.safetensors").unlink()
    (checkpoint / "reasoner" / "config.json").unlink()
    (checkpoint / "projection.safetensors").unlink()
    (checkpoint / "tokenizer_config.json").unlink()
    expected = ["generator/model.safetensors", "reasoner/config.json", "projection.safetensors",
                "tokenizer_config.json"]
    with pytest.raises(FileNotFoundError) as err:
        FlyThinker.from_pretrained(checkpoint)
    for name in expected[:3]:
        assert name in str(err.value)
    assert "tokenizer_config.json" not in str(err.value)  # from_pretrained reads no tokenizer
    with pytest.raises(FileNotFoundError, match=re.escape("tokenizer_config.json")):
        load_flythinker(str(checkpoint), None, 0.5, "global", "linear")


def test_a_folder_without_flythinker_json_says_so(checkpoint):
    (checkpoint / "flythinker.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete FlyThinker checkpoint: missing flythinker.json"):
        FlyThinker.from_pretrained(checkpoint)


def test_rank0_weights_of_a_hub_id_come_from_its_downloaded_snapshot(pair, tmp_path, monkeypatch):
    """A hub id (`owner/name`, allowed at start-up with hub access on) is not a local folder: rank 0's
    WeightReader fetches only its safetensors files (huggingface_hub.snapshot_download, stubbed here with a
    local folder: no network in tests) and reads the same tensors as from the folder itself."""
    import huggingface_hub

    from flythinker_worker.loading import WeightReader

    generator, _, _ = pair
    generator.save_pretrained(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    reader = WeightReader({"generator.": "owner/tiny-generator"})
    key = "generator.model.layers.0.mlp.up_proj.weight"
    weight = generator.model.layers[0].mlp.up_proj.weight
    assert torch.equal(reader.rows(key, 1, 3), weight[1:3].detach())
    assert calls == [("owner/tiny-generator", ["*.safetensors", "*.safetensors.index.json"])]
