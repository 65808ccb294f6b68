"""Loading checkpoints and model folders: an incomplete FlyThinker checkpoint names every missing file."""

import re

import pytest

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
