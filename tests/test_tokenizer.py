import json

import pytest
import tokenizers
from tokenizers.models import WordPiece

from sslens import SSLensError, synth
from sslens.tokenizer import (
    EOS,
    UNK,
    alphabet_size,
    encode,
    encode_batch,
    load_tokenizer,
    placeholder_tokenizer,
    save_tokenizer,
    simplestories_pipeline,
    train_tokenizer,
)

from conftest import shared_file

OFFICIAL = ["simplestories-tokenizer/simplestories-4096.json", "simplestories-tokenizer/simplestories-tokenizer.json"]
PIPELINE = ["normalizer", "pre_tokenizer", "post_processor", "decoder"]


def tinystories() -> list[str]:
    text = shared_file("tinystories/tiny_stories_train_head.txt").read_text(encoding="utf-8")
    return [s for s in text.split("\n") if s.strip()]


@pytest.mark.parametrize("relative", OFFICIAL)
def test_recipe_on_the_official_vocab_reproduces_official_ids(relative):
    path = shared_file(relative)
    official = tokenizers.Tokenizer.from_file(str(path))
    vocab = json.loads(path.read_text())["model"]["vocab"]
    ours = simplestories_pipeline(tokenizers.Tokenizer(WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##")))
    stories = tinystories()
    assert len(stories) > 1000
    expected = [e.ids for e in official.encode_batch(stories)]
    assert encode_batch(ours, stories, eos=True) == expected
    assert [encode(load_tokenizer(path), s, eos=True) for s in stories[:50]] == expected[:50]
    assert sum(ids.count(0) for ids in expected) > 0  # the sample has [UNK]s (its mojibake): they are kept


@pytest.mark.parametrize("relative", OFFICIAL)
def test_eos_is_explicit(relative):
    tok = load_tokenizer(shared_file(relative))
    assert tok.encode("Once upon a time").ids[-1] == 1  # the file's post-processor appends [EOS] ...
    prompt = encode(tok, "Once upon a time", eos=False)
    assert prompt and prompt[-1] != 1  # ... a prompt encoded through sslens does not end in it
    assert encode(tok, "Once upon a time", eos=True) == prompt + [1]


def test_trained_tokenizer_has_the_official_pipeline_and_special_ids(tmp_path):
    official = json.loads(shared_file(OFFICIAL[0]).read_text())
    tok = train_tokenizer(tinystories(), vocab_size=1000)
    trained = json.loads(tok.to_str())
    assert {k: trained[k] for k in PIPELINE} == {k: official[k] for k in PIPELINE}
    assert tok.get_vocab_size() == 1000 and tok.token_to_id(UNK) == 0 and tok.token_to_id(EOS) == 1
    story = "Lily found a ``shiny'' needle in her room. She was 3 years old!"
    ids = encode(tok, story, eos=True)
    assert ids[-1] == 1 and 0 not in ids
    assert tok.decode(ids) == 'lily found a " shiny " needle in her room. she was 3 years old!'
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind
    assert encode(load_tokenizer(tmp_path / "tokenizer.json"), story, eos=True) == ids


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(SSLensError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SSLensError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")
    no_eos = tokenizers.Tokenizer(WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert encode(no_eos, "a", eos=False) == [1]
    with pytest.raises(SSLensError, match=r"no \[EOS\]"):
        encode(no_eos, "a", eos=True)


def test_placeholder_tokenizer_maps_words_to_ids():
    tok = placeholder_tokenizer(4096)
    assert tok.get_vocab_size() == 4096 and encode(tok, "t7 t4095 [EOS] nonsense", eos=False) == [7, 4095, 1, 0]


def test_a_vocabulary_below_the_alphabet_is_refused_naming_the_smallest_that_works():
    """WordPiece keeps [UNK], [EOS] and each character alone and as a ##continuation whatever vocab_size asks: for
    "ab ba abc" that is 8 entries (a, b, c, ##a, ##b, ##c). Asking for fewer is refused naming 8, which works."""
    texts = ["ab ba abc"] * 3
    assert train_tokenizer(texts, vocab_size=8).get_vocab_size() == 8
    assert alphabet_size(train_tokenizer(texts, vocab_size=20)) == 8
    for asked in (2, 7):
        with pytest.raises(
            SSLensError,
            match=f"a vocabulary of {asked} tokens cannot hold these stories: .* take 8; "
            r"ask for at least 8 \(d_vocab when training, --vocab-size for",
        ):
            train_tokenizer(texts, vocab_size=asked)
    with pytest.raises(SSLensError, match="the vocabulary size must be positive, got -1"):
        train_tokenizer(texts, vocab_size=-1)


def test_training_is_deterministic():
    """Equally frequent pairs abound late in training; the library's trainer alone breaks their ties by ids it hands
    out in hash-map order, so without fixed ids for the ##continuations repeated runs learn different vocabularies
    (this test fails without them)."""
    stories = [synth.story(7, i)["story"] for i in range(1000)]
    first = train_tokenizer(stories, vocab_size=2500).to_str()
    for _ in range(4):
        assert train_tokenizer(iter(stories), vocab_size=2500).to_str() == first
