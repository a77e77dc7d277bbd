import json
import os
import subprocess
import sys
import time

import datasets
import numpy as np
import pandas as pd
import pytest

from sslens import SSLensError
from sslens.data import Batches, load_stories, tokenize, train_val
from sslens.fileio import DiskFull, mib
from sslens.tokenizer import encode_batch, load_tokenizer, save_tokenizer, train_tokenizer

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
    {
        ".parquet": lambda: df.to_parquet(path),
        ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
        ".json": lambda: path.write_text(json.dumps(df.to_dict(orient="records"))),
    }[suffix]()
    ds = load_stories(path)
    assert list(ds["story"]) == STORIES and ds["theme"][:2] == ["Friendship", "Courage"] and ds["word_count"][-1] == 39


def test_hf_directory_layout_uses_its_test_split(tmp_path):
    (tmp_path / "data").mkdir()
    frame()[:30].to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    frame()[30:].to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    split = train_val(tmp_path)
    train, val = split.train, split.val
    assert split.held_out is None and split.record(tmp_path, 0)["validation"] == "test split"
    assert list(train["story"]) == STORIES[:30] and list(val["story"]) == STORIES[30:]


def test_single_file_holds_out_a_fixed_fraction(tmp_path):
    frame().to_parquet(tmp_path / "s.parquet")
    split = train_val(tmp_path / "s.parquet", val_fraction=0.1, seed=3)
    train, val, again = split.train, split.val, train_val(tmp_path / "s.parquet", val_fraction=0.1, seed=3).val
    assert list(val["story"]) == [STORIES[i] for i in split.held_out]
    assert len(val) == 4 and list(val["story"]) == list(again["story"])
    assert sorted(list(train["story"]) + list(val["story"])) == sorted(STORIES)


def test_txt_rules(tmp_path):
    stories = load_stories(shared_file("tinystories/tinystories_sample_cs336.txt"))
    assert len(stories) == 5 and all("<|endoftext|>" not in s for s in stories["story"])
    (tmp_path / "s.txt").write_text("One day, Mia ran.\nShe fell.\n\n\nThe end came.\n  \nLast one.")
    assert list(load_stories(tmp_path / "s.txt")["story"]) == [
        "One day, Mia ran.\nShe fell.",
        "The end came.",
        "Last one.",
    ]


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
    tokenize(stories, train_tokenizer(STORIES, vocab_size=50), cache_dir=tmp_path / "c")  # fewer merges: another
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


def write_bad_data_files(d):
    """Data files sslens must refuse with one line naming the file, the fault and what it expects."""
    (d / "dir_without_data").mkdir()
    (d / "dir_without_data" / "README.md").write_text("no data here")
    (d / "dir_with_bad_shard" / "data").mkdir(parents=True)
    (d / "dir_with_bad_shard" / "data" / "train-0.jsonl").write_text('{"story": "a"}\n{"story": "b"\n')
    pd.DataFrame({"story": pd.Series([], dtype=str)}).to_parquet(d / "no_rows.parquet")
    (d / "zero_bytes.parquet").write_bytes(b"")
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n  \n")
    (d / "cut_line.jsonl").write_text('{"story": "a"}\n\n{"story": "b"}\n{"story": "a"\n{"story": "c"}\n')
    (d / "not_objects.jsonl").write_text('{"story": "a"}\n["b"]\n')
    (d / "latin1.jsonl").write_bytes('{"story": "a"}\n{"story": "caf\xe9"}\n'.encode("latin-1"))
    (d / "cut_array.json").write_text('[{"story": "a"},\n {"story": "b"\n]')
    (d / "latin1.txt").write_bytes("One day.\n\nThe caf\xe9 was shut.".encode("latin-1"))
    return d


BAD_FILES = [
    ("dir_without_data", "holds no .parquet, .jsonl or .json files"),
    ("dir_with_bad_shard", "train-0.jsonl line 2 is not valid JSON"),
    ("no_rows.parquet", "no_rows.parquet holds no stories"),
    ("zero_bytes.parquet", "zero_bytes.parquet is not a parquet file"),
    ("empty.jsonl", "empty.jsonl is empty: it holds no stories"),
    ("blank.jsonl", "blank.jsonl is empty: it holds no stories"),
    ("cut_line.jsonl", "cut_line.jsonl line 4 is not valid JSON"),
    ("not_objects.jsonl", "not_objects.jsonl line 2 is not a JSON object"),
    ("latin1.jsonl", "latin1.jsonl is not UTF-8 text: byte 29 (0xe9)"),
    ("cut_array.json", "cut_array.json line 3 is not valid JSON"),
    ("latin1.txt", "latin1.txt is not UTF-8 text: byte 17 (0xe9)"),
]


@pytest.mark.parametrize("name, words", BAD_FILES, ids=[n for n, _ in BAD_FILES])
def test_bad_data_files_are_refused_naming_the_file_and_the_fault(tmp_path, name, words):
    with pytest.raises(SSLensError) as e:
        load_stories(write_bad_data_files(tmp_path) / name)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    if "JSON" in words:
        assert "one JSON object per line" in str(e.value)
    if "UTF-8" in words:
        assert "sslens reads UTF-8 text" in str(e.value)


# Tokenizes a parquet file into a cache directory, but never gets past its first chunk: a writer to kill.
STUCK_WRITER = """
import sys, time
import sslens.data as d
from sslens.tokenizer import load_tokenizer
d.encode_batch = lambda *args, **kwargs: time.sleep(600)
d.tokenize(d.load_stories(sys.argv[1]), load_tokenizer(sys.argv[2]), cache_dir=sys.argv[3])
"""


def test_a_killed_cache_write_is_cleared_on_the_next_start_but_a_live_one_is_not(tmp_path, tok):
    """A token-cache writer killed mid-write leaves its temporary file; the next start removes it (its pid is
    dead), and any temporary file untouched for an hour, but never one a live writer is still writing."""
    frame().to_parquet(tmp_path / "s.parquet")
    save_tokenizer(tok, tmp_path / "tok.json")
    cache = tmp_path / "c"
    args = [str(tmp_path / "s.parquet"), str(tmp_path / "tok.json"), str(cache)]
    writer = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, *args])
    try:
        deadline = time.time() + 120
        while not list(cache.glob(".*.tmp")):
            assert writer.poll() is None and time.time() < deadline, "the writer never started its file"
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    live = cache / f".other.u16.{os.getpid()}.0123abcd.tmp"
    old = cache / f".older.u16.{os.getpid()}.4567cdef.tmp"
    for path in (live, old):
        path.write_bytes(b"\0\0")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    tokenize(load_stories(tmp_path / "s.parquet"), tok, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [live.name]
    assert len([p for p in cache.iterdir() if p.suffix == ".u16"]) == 1


def test_a_full_disk_while_caching_tokens_names_the_cache_and_the_room_and_leaves_nothing(small_disk, tmp_path, tok):
    stories = datasets.Dataset.from_dict({"story": STORIES * 200})  # chunks alike, so the estimate is exact
    size = tokenize(stories, tok, cache_dir=tmp_path).nbytes
    disk = small_disk("64k")
    with pytest.raises(DiskFull, match=rf"writing {disk}/\w+-\w+\.u16 needs about {mib(size)}"):
        tokenize(stories, tok, cache_dir=disk, chunk_size=1000)
    assert list(disk.iterdir()) == []
