import json

import numpy as np
import pandas as pd
import pytest

from sslens import SSLensError
from sslens.data import Batches, load_stories, tokenize, train_val
from sslens.tokenizer import encode_batch, load_tokenizer, train_tokenizer

from conftest import shared_file

STORIES = [f"Story {i}: Mia saw {i % 7} red birds.\nThey sang." for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(STORIES * 3, vocab_size=200)


def frame() -> pd.DataFrame:
    return pd.DataFrame({"story": STORIES, "theme": ["Friendship", "Courage"] * 20, "word_count": range(40)})


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_local_files_keep_metadata(tmp_path, suffix):
    path = tmp_path / f"stories{suffix}"
    df = frame()
    {".parquet": lambda: df.to_parquet(path), ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".json": lambda: path.write_text(json.dumps(df.to_dict(orient="records")))}[suffix]()
    ds = load_stories(path)
    assert list(ds["story"]) == STORIES and ds["theme"][:2] == ["Friendship", "Courage"] and ds["word_count"][-1] == 39


def test_hf_directory_layout_uses_its_test_split(tmp_path):
    (tmp_path / "data").mkdir()
    frame()[:30].to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    frame()[30:].to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    train, val = train_val(tmp_path)
    assert list(train["story"]) == STORIES[:30] and list(val["story"]) == STORIES[30:]


def test_single_file_holds_out_a_fixed_fraction(tmp_path):
    frame().to_parquet(tmp_path / "s.parquet")
    train, val = train_val(tmp_path / "s.parquet", val_fraction=0.1, seed=3)
    again = train_val(tmp_path / "s.parquet", val_fraction=0.1, seed=3)[1]
    assert len(val) == 4 and list(val["story"]) == list(again["story"])
    assert sorted(list(train["story"]) + list(val["story"])) == sorted(STORIES)


def test_txt_rules(tmp_path):
    stories = load_stories(shared_file("tinystories/tinystories_sample_cs336.txt"))
    assert len(stories) == 5 and all("<|endoftext|>" not in s for s in stories["story"])
    (tmp_path / "s.txt").write_text("One day, Mia ran.\nShe fell.\n\n\nThe end came.\n  \nLast one.")
    assert list(load_stories(tmp_path / "s.txt")["story"]) == ["One day, Mia ran.\nShe fell.", "The end came.", "Last one."]


def test_text_column_detection_and_errors(tmp_path):
    pd.DataFrame({"text": ["a b", "c d"]}).to_parquet(tmp_path / "t.parquet")
    assert list(load_stories(tmp_path / "t.parquet")["story"]) == ["a b", "c d"]
    pd.DataFrame({"body": ["a b"]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(SSLensError, match="no text column 'story or text'.*body"):
        load_stories(tmp_path / "b.parquet")
    assert list(load_stories(tmp_path / "b.parquet", text_column="body")["story"]) == ["a b"]
    with pytest.raises(SSLensError, match="not found"):
        load_stories(tmp_path / "missing.parquet")
    (tmp_path / "x.csv").write_text("story\na\n")
    with pytest.raises(SSLensError, match="unsupported file type '.csv'"):
        load_stories(tmp_path / "x.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SSLensError, match="no stories"):
        load_stories(tmp_path / "empty.txt")


def test_unreachable_hub_names_the_offline_options():
    with pytest.raises(SSLensError, match="--data=synth"):
        load_stories("SimpleStories/SimpleStories")


def test_each_story_then_one_eos_nothing_dropped(tmp_path):
    """On real TinyStories text (with [UNK]s from its mojibake), the stream is exactly the direct encodings."""
    tok = load_tokenizer(shared_file("simplestories-tokenizer/simplestories-4096.json"))
    stories = load_stories(shared_file("tinystories/tiny_stories_train_head.txt"))
    stream = tokenize(stories, tok, cache_dir=tmp_path, chunk_size=300)
    direct = [e.ids for e in tok.encode_batch(list(stories["story"]))]  # the official file appends [EOS] itself
    assert stream.dtype == np.uint16 and stream.tolist() == [i for ids in direct for i in ids]
    assert int((stream == 1).sum()) == len(stories) and int((stream == 0).sum()) > 0  # [UNK] kept


def test_cache_reused_and_invalidated(tmp_path, tok, monkeypatch):
    stories = load_stories_from(tmp_path, STORIES)
    first = tokenize(stories, tok, cache_dir=tmp_path / "c")
    monkeypatch.setattr("sslens.data.encode_batch", lambda *a, **k: pytest.fail("re-tokenized a cached stream"))
    assert tokenize(stories, tok, cache_dir=tmp_path / "c").tolist() == first.tolist()
    monkeypatch.setattr("sslens.data.encode_batch", encode_batch)
    tokenize(load_stories_from(tmp_path, STORIES[:-1] + ["changed"]), tok, cache_dir=tmp_path / "c")
    tokenize(stories, train_tokenizer(STORIES, vocab_size=150), cache_dir=tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(names) == 3 and all(n.endswith(".u16") and not n.startswith(".") for n in names)


def load_stories_from(tmp_path, stories):
    path = tmp_path / f"s{abs(hash(tuple(stories)))}.parquet"
    pd.DataFrame({"story": stories}).to_parquet(path)
    return load_stories(path)


def test_batches_cover_each_window_once_per_epoch_and_resume():
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)  # 10 windows of n_ctx 8
    batches = Batches(tokens, n_ctx=8, batch_size=5, seed=0)
    windows = next(batches)
    assert windows.shape == (5, 9) and (windows[:, 1:] == windows[:, :-1] + 1).all()  # n_ctx inputs, one more target
    starts = [int(r[0]) for r in windows] + [int(r[0]) for r in next(batches)]
    assert sorted(starts) == list(range(0, 80, 8)) and starts != sorted(starts)  # epoch 0 saw every window once
    assert batches.position == 10
    later = [next(batches) for _ in range(3)]
    resumed = Batches(tokens, n_ctx=8, batch_size=5, seed=0, position=10)
    assert all((a == next(resumed)).all() for a in later)
    other_seed = Batches(tokens, n_ctx=8, batch_size=5, seed=1)
    assert not (next(Batches(tokens, 8, 5, 0)) == next(other_seed)).all()
    with pytest.raises(SSLensError, match="fewer than one window"):
        Batches(np.arange(5, dtype=np.uint16), n_ctx=8, batch_size=1)


def test_interrupted_tokenization_leaves_nothing(tmp_path, tok, monkeypatch):
    calls = []

    def fail_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode_batch(*args, **kwargs)

    monkeypatch.setattr("sslens.data.encode_batch", fail_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize(load_stories_from(tmp_path, STORIES), tok, cache_dir=tmp_path / "c", chunk_size=10)
    assert list((tmp_path / "c").iterdir()) == []
