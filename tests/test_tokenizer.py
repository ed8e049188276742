"""dllm_jax.tokenizer against transformers' PreTrainedTokenizerFast on tiny tokenizers built here."""

from __future__ import annotations

import json
import os

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dllm_jax.tokenizer import Tokenizer, TokenizerError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Diffusion language models decode many tokens in parallel!",
    "Alice, Bob and Carol stand in a line; reverse the line.",
    "What is 12 times 4? It's 48, isn't it?",
    "Ünïcödé text: café, naïve, 東京.",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}\n"
    "  <|start|>{{ message['role'] }}\n"
    "{{ message['content'] | trim }}<|end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Reverse: Alice, Bob, Carol  "},
    {"role": "assistant", "content": "Carol, Bob, Alice"},
    {"role": "user", "content": "And 東京?"},
]

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>", "<|start|>", "<|end|>"]


def _bpe_dir(path, *, post_bos: bool, config_extra: dict | None = None, jinja_file: str | None = None):
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "bos_token": "<|bos|>",
        "eos_token": {"content": "<|eos|>", "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "__type": "AddedToken"},
        "pad_token": "<|pad|>",
        "mask_token": "<|mask|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    config.update(config_extra or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if jinja_file is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja_file)
    return str(path)


def _wordlevel_dir(path):
    """WordLevel tokenizer whose special tokens are plain vocabulary entries (not added tokens)."""
    words = sorted({w for s in CORPUS for w in pre_tokenizers.Whitespace().pre_tokenize_str(s) for w in [w[0]]})
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"unk_token": "[UNK]", "bos_token": "[BOS]", "add_bos_token": True,
                   "clean_up_tokenization_spaces": True, "chat_template": "ignored {{ messages }}"}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": {"content": "[EOS]", "lstrip": False, "rstrip": False, "normalized": False,
                                 "single_word": False}}, f)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}[BOS] {{ m.content }} [EOS]\n{% endfor %}")
    return str(path)


def _hf(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


TEXTS = CORPUS + ["<|start|>user\nhi<|end|>", "  leading and trailing  ", "a<|pad|>b", "Alice Bob [BOS] Carol"]


@pytest.mark.parametrize("post_bos", [False, True])
def test_bpe_matches_transformers(tmp_path, post_bos):
    d = _bpe_dir(tmp_path / "bpe", post_bos=post_bos)
    ours, theirs = Tokenizer.from_dir(d), _hf(d)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == theirs.apply_chat_template(
            MESSAGES, add_generation_prompt=gen, tokenize=False
        )
    assert ours.pad_id == theirs.pad_token_id and ours.eos_id == theirs.eos_token_id
    assert ours.bos_id == theirs.bos_token_id


def test_config_add_bos_and_jinja_file(tmp_path):
    d = _bpe_dir(tmp_path / "bpe2", post_bos=False, config_extra={"add_bos_token": True, "add_eos_token": True},
                 jinja_file="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    ours, theirs = Tokenizer.from_dir(d), _hf(d)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.bos_id not in ours.encode("hi")  # config flags are ignored when tokenizer.json exists
    rendered = ours.apply_chat_template(MESSAGES)
    assert rendered.startswith("system: You are terse.\n")
    assert rendered == theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def test_wordlevel_special_tokens_from_vocab(tmp_path):
    d = _wordlevel_dir(tmp_path / "wl")
    ours, theirs = Tokenizer.from_dir(d), _hf(d)
    assert ours.special_tokens["eos_token"] == "[EOS]"  # from special_tokens_map.json
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )


def test_batch_encode_left_pads(tmp_path):
    d = _bpe_dir(tmp_path / "bpe", post_bos=True)
    ours = Tokenizer.from_dir(d)
    texts = ["Hi", "The quick brown fox jumps over the lazy dog.", "Bob"]
    ids, valid = ours.batch_encode(texts)
    assert ids.dtype == np.int32 and valid.dtype == bool and ids.shape == valid.shape
    lens = [len(ours.encode(t)) for t in texts]
    assert ids.shape == (3, max(lens))
    for b, (t, n) in enumerate(zip(texts, lens)):
        assert valid[b].sum() == n and valid[b, -n:].all() and not valid[b, :-n].any()
        assert ids[b, -n:].tolist() == ours.encode(t)
        assert (ids[b, :-n] == ours.pad_id).all()
    assert valid[1].all()
    # same layout as transformers with padding_side="left"
    theirs = _hf(d)
    theirs.padding_side = "left"
    enc = theirs(texts, padding=True)
    np.testing.assert_array_equal(ids, np.array(enc["input_ids"]))
    np.testing.assert_array_equal(valid, np.array(enc["attention_mask"]).astype(bool))


def test_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="No tokenizer.json in .*copy tokenizer.json"):
        Tokenizer.from_dir(empty)
    with pytest.raises(TokenizerError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "nope")
    d = _bpe_dir(tmp_path / "bpe", post_bos=False)
    tok = Tokenizer.from_dir(d)
    with pytest.raises(TokenizerError, match="empty"):
        tok.encode("")
    with pytest.raises(TokenizerError, match="Prompt 1: .*empty"):
        tok.batch_encode(["hello", ""])
    with pytest.raises(TokenizerError, match="no prompt"):
        tok.batch_encode([])
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not be read"):
        Tokenizer.from_dir(tmp_path / "bad")
    no_template = Tokenizer(backend=tok.backend, special_tokens=tok.special_tokens)
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template(MESSAGES)


def test_sandbox_blocks_unsafe_template(tmp_path):
    d = _bpe_dir(tmp_path / "bpe", post_bos=False)
    tok = Tokenizer.from_dir(d)
    evil = Tokenizer(backend=tok.backend, special_tokens=tok.special_tokens,
                     chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(MESSAGES)
    tojson = Tokenizer(backend=tok.backend, special_tokens=tok.special_tokens,
                       chat_template="{{ messages[0] | tojson }}{% generation %}<g>{% endgeneration %}")
    assert tojson.apply_chat_template([{"role": "user", "content": "<b>&東"}]) == (
        '{"role": "user", "content": "<b>&東"}<g>'
    )


def test_unknown_words_are_never_silent(tmp_path, capsys):
    d = _wordlevel_dir(tmp_path / "wl")
    text = "Alice zorblax Bob qux zorblax [UNK]"
    with pytest.raises(TokenizerError, match=r"'zorblax', 'qux'; they would be read as \[UNK\]"):
        Tokenizer.from_dir(d, unknown_words="error").encode(text)
    capsys.readouterr()
    warned = Tokenizer.from_dir(d).encode(text)                       # default: warn
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "'zorblax', 'qux'" in err and err.count("\n") == 1
    assert warned == Tokenizer.from_dir(d, unknown_words="ignore").encode(text)
    assert capsys.readouterr().err == ""
    # the unknown token typed literally is not an unknown word; a BPE without <unk> never warns
    Tokenizer.from_dir(d, unknown_words="error").encode("Alice [UNK] Bob")
    Tokenizer.from_dir(_bpe_dir(tmp_path / "bpe", post_bos=False), unknown_words="error").encode(
        "Zürich ☃ 東京")
    with pytest.raises(TokenizerError, match="unknown_words must be one of"):
        Tokenizer.from_dir(d, unknown_words="loud")
