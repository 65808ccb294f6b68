"""evaluation.convert_authors: a fake authors' checkpoint built from the tiny pair (their joint module's
`Generator.` / `Reasoner.` key prefixes, torch.save), converted with the CLI, loaded with
FlyThinker.from_pretrained: every weight and one forward equal to the model it came from; bad inputs."""

import pickle
import sys
from pathlib import Path

import pytest
import torch

from evaluation.convert_authors import ConversionError, convert, load_state_dict, main, split_state_dict
from flythinker_worker.model import FlyThinker
from flythinker_worker.tiny import tiny_pair


class NotATensor:  # module level so pickle can name it: what weights_only must refuse to rebuild
    def __reduce__(self):
        return (print, ("this would run on load",))


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=3)


def _authors_checkpoint(tmp_path: Path, generator, reasoner, extra=None) -> Path:
    state = {f"Generator.{k}": v.clone() for k, v in generator.state_dict().items()}
    state.update({f"Reasoner.{k}": v.clone() for k, v in reasoner.state_dict().items()})
    state.update(extra or {})
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return path


def _configs(tmp_path: Path, generator, reasoner, tokenizer) -> tuple[Path, Path]:
    gen_dir, rea_dir = tmp_path / "gen_config", tmp_path / "rea_config"
    generator.config.save_pretrained(gen_dir)  # config only, as the authors' base model folders provide
    tokenizer.save_pretrained(gen_dir)
    reasoner.config.save_pretrained(rea_dir)
    return gen_dir, rea_dir


def _batch(tokenizer):
    enc = tokenizer(["the user wrote about dogs", "a short one"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_convert_round_trip(tmp_path, pair):
    generator, reasoner, tokenizer = pair
    ckpt = _authors_checkpoint(tmp_path, generator, reasoner)
    gen_dir, rea_dir = _configs(tmp_path, generator, reasoner, tokenizer)
    out = tmp_path / "converted"
    assert main(["--checkpoint", str(ckpt), "--generator-config", str(gen_dir), "--reasoner-config", str(rea_dir),
                 "--out", str(out), "--lam", "1.0", "--positions", "global"]) == 0
    loaded = FlyThinker.from_pretrained(out).eval()
    assert loaded.lam == 1.0 and loaded.positions.value == "global" and loaded.projection is None
    for name, original in (("generator", generator), ("reasoner", reasoner)):
        want, got = original.state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"
    reference = FlyThinker(generator, reasoner, lam=1.0, positions="global").eval()
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        a = loaded(input_ids=ids, attention_mask=mask).logits
        b = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert (out / "tokenizer_config.json").is_file() and (out / "generator" / "tokenizer_config.json").is_file()


def test_convert_with_projection_and_wrappers(tmp_path, pair):
    generator, reasoner, tokenizer = pair
    d_g, d_r = generator.config.hidden_size, reasoner.config.hidden_size
    torch.manual_seed(0)
    proj = {"projection.weight": torch.randn(d_g, d_r), "projection.bias": torch.randn(d_g)}
    ckpt = _authors_checkpoint(tmp_path, generator, reasoner, proj)
    torch.save({"module": torch.load(ckpt, weights_only=True)}, ckpt)  # a DeepSpeed-style wrapper
    gen_dir, rea_dir = _configs(tmp_path, generator, reasoner, tokenizer)
    out = tmp_path / "converted"
    assert main(["--checkpoint", str(tmp_path), "--generator-config", str(gen_dir),  # a folder holding it
                 "--reasoner-config", str(rea_dir), "--out", str(out), "--lam", "0.5",
                 "--positions", "output_only"]) == 0
    loaded = FlyThinker.from_pretrained(out)
    assert loaded.projection_kind.value == "linear" and loaded.positions.value == "output_only"
    assert torch.equal(loaded.projection.weight, proj["projection.weight"])
    assert torch.equal(loaded.projection.bias, proj["projection.bias"])


def test_unknown_prefixes_are_listed(pair):
    generator, reasoner, _ = pair
    state = {f"Generator.{k}": v for k, v in generator.state_dict().items()}
    state.update({f"Reasoner.{k}": v for k, v in reasoner.state_dict().items()})
    state.update({"Critic.head.weight": torch.zeros(1), "Critic.head.bias": torch.zeros(1), "temperature": torch.ones(1)})
    with pytest.raises(ConversionError, match=r"unknown top-level prefixes.*'Critic' \(2 keys\), 'temperature' \(1 keys\)"):
        split_state_dict(state)
    with pytest.raises(ConversionError, match="no 'Reasoner.' keys"):
        split_state_dict({k: v for k, v in state.items() if k.startswith("Generator.")})


def test_wrong_shapes_and_missing_keys_are_clear(tmp_path, pair):
    generator, reasoner, tokenizer = pair
    gen_dir, rea_dir = _configs(tmp_path, generator, reasoner, tokenizer)
    # reasoner weights under the generator's config: shapes do not fit
    swapped = {f"Generator.{k}": v for k, v in reasoner.state_dict().items()}
    swapped.update({f"Reasoner.{k}": v for k, v in reasoner.state_dict().items()})
    torch.save(swapped, tmp_path / "bad.bin")
    with pytest.raises(ConversionError, match="'Generator.' weights do not fit"):
        convert(tmp_path / "bad.bin", gen_dir, rea_dir, tmp_path / "o")
    dropped = {k: v for k, v in _full_state(generator, reasoner).items() if "layers.0.mlp" not in k}
    torch.save(dropped, tmp_path / "missing.bin")
    with pytest.raises(ConversionError, match=r"missing \['model.layers.0.mlp"):
        convert(tmp_path / "missing.bin", gen_dir, rea_dir, tmp_path / "o")


def _full_state(generator, reasoner):
    state = {f"Generator.{k}": v for k, v in generator.state_dict().items()}
    state.update({f"Reasoner.{k}": v for k, v in reasoner.state_dict().items()})
    return state


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:
        pickle.dump({"Generator.x": NotATensor()}, f)
    with pytest.raises(ConversionError, match="cannot be loaded safely"):
        load_state_dict(path)


def test_raw_zero_folder_without_deepspeed_says_how_to_consolidate(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on machines without the extra
    zero = tmp_path / "checkpoint-100"
    (zero / "global_step100").mkdir(parents=True)
    (zero / "latest").write_text("global_step100")
    (zero / "global_step100" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"pip install -e \.\[deepspeed\].*zero_to_fp32\.py"):
        load_state_dict(zero)
    assert main(["--checkpoint", str(zero), "--generator-config", str(tmp_path), "--reasoner-config",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "raw DeepSpeed ZeRO checkpoint" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="does not exist"):
        load_state_dict(tmp_path / "nope.bin")
