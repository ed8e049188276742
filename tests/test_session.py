"""The front door (`dllm_jax.session`): folder resolution, padding, EOS cutting, prompt
checks, and Session.generate against a direct `decode.generate` call."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from controllers import make_controller
from dllm_jax import session
from dllm_jax.config import ConfigError, GenerateConfig
from dllm_jax.decode import generate
from dllm_jax.pretrained import bundled_model_dir


def test_resolve_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert session.resolve_model_dir(None) == bundled_model_dir()
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert session.resolve_model_dir("~/m") == tmp_path / "m"
    with pytest.raises(ConfigError, match="--model DIR"):
        session.resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ConfigError, match="--from DIR"):
        session.resolve_model_dir(tmp_path / "missing", flag="--from")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="--model .* is a file"):
        session.resolve_model_dir(tmp_path / "f")


def test_task_models_refuse_unknown_words(tmp_path: Path) -> None:
    """The bundled model is a task model (train_config.json): its closed vocabulary makes an
    unknown word an error, not a silent <unk>; other models only warn."""
    from dllm_jax.tokenizer import TokenizerError

    s = session.load()
    assert s.tokenizer.unknown_words == "error"
    with pytest.raises(TokenizerError, match="'Amy'"):
        s.encode("reverse: Eve Amy")
    assert session.unknown_words_policy(None) == "warn"
    (tmp_path / "train_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a training record"):
        session.read_train_config(tmp_path)


def test_left_pad_and_fill_rows() -> None:
    ids, valid = session.left_pad([[7, 8], [9]], pad_id=0, width=4, rows=3)
    assert ids.tolist() == [[0, 0, 7, 8], [0, 0, 0, 9], [0, 0, 7, 8]]
    assert valid.tolist() == [[False, False, True, True], [False, False, False, True],
                              [False, False, True, True]]
    assert ids.dtype == np.int32
    with pytest.raises(ConfigError, match="does not fit"):
        session.left_pad([[1, 2, 3]], 0, width=2)
    with pytest.raises(ConfigError, match="no prompts"):
        session.left_pad([], 0)


def test_cut_at_eos() -> None:
    assert session.cut_at_eos([5, 6, 1, 7, 1], eos_id=1) == [5, 6]
    assert session.cut_at_eos(np.array([5, 6]), eos_id=1) == [5, 6]
    assert session.cut_at_eos([1, 5], eos_id=1) == []


def test_generate_equals_the_library_decode() -> None:
    s = session.load()
    assert s.tokenizer is not None and s.answer_length == 32
    gen = GenerateConfig(gen_length=32, steps=16)
    ctrl = make_controller("threshold", threshold=0.9)
    prompts = ["sort: 9 4 7 1", "reverse: Eve Bob Zoe Uma"]
    answers = s.generate(prompts, gen, ctrl, key=jax.random.key(3), rows=4)
    assert len(answers) == 2
    for text, a in zip(prompts, answers):
        ids = s.tokenizer.encode(text)
        out = generate(s.params, s.cfg, np.asarray([ids], np.int32), gen, ctrl,
                       key=jax.random.key(3))
        want = session.cut_at_eos(np.asarray(out.tokens[0]), s.cfg.eos_token_id)
        assert a.tokens == want
        assert a.text == s.tokenizer.decode(want)
        assert a.nfe == int(out.stats.nfe[0])
    assert answers[0].text.split() == ["1", "4", "7", "9"]


def test_bad_prompts_are_sentences() -> None:
    s = session.load()
    gen = GenerateConfig(gen_length=32, steps=32)
    ctrl = make_controller("low_confidence")
    with pytest.raises(ConfigError, match="prompt is empty"):
        s.generate(["   "], gen, ctrl)
    with pytest.raises(ConfigError, match=r"must lie in \[0,"):
        s.generate([[10 ** 6]], gen, ctrl)
    with pytest.raises(ConfigError, match="exceeds the model's maximum length"):
        s.generate([[5] * 40], gen, ctrl)
