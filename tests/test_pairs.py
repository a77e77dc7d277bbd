"""Counterfactual pairs differ in exactly their factor: checked against the corpus's own generator (the clean side is
the corpus story; the corrupt side is what the generator writes when the factor alone is changed) and by undoing
the change in the text."""

import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from sslens import pairs, synth
from sslens.errors import SSLensError
from sslens.tokenizer import encode, train_tokenizer

N = 12


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer((synth.story(7, i)["story"] for i in range(400)), vocab_size=1024)


def only_the_slot_differs(pair: dict) -> bool:
    """Write each counterfactual value back as the clean one (longest first) and compare; pronouns word by word,
    since "her" stands for both "him" and "his"."""
    changes = list(zip(pair["corrupt_value"].split(" / "), pair["clean_value"].split(" / ")))
    if pair["factor"] == "pronoun":
        clean, corrupt = (re.findall(r"\w+|\W+", pair[k]) for k in ("clean_story", "corrupt_story"))
        return len(clean) == len(corrupt) and all(a == b or (b, a) in changes for a, b in zip(clean, corrupt))
    text = pair["corrupt_story"]
    for new, old in sorted(changes, key=lambda c: -len(c[0])):
        text = text.replace(new, old)
    return text == pair["clean_story"]


@pytest.mark.parametrize("factor", pairs.SLOT_FACTORS)
def test_slot_pairs_are_aligned_and_differ_only_in_the_slot(tok, factor):
    rows = pairs.pairs(factor, N, seed=7, tokenizer=tok)
    assert len(rows) == N and len({r["generation_id"] for r in rows}) == N
    for row in rows:
        index = int(row["generation_id"].split("-")[2])
        assert row["clean_story"] == synth.story(7, index)["story"], "the clean side is the corpus story"
        assert row["corrupt_story"] != row["clean_story"]
        assert only_the_slot_differs(row)
        clean, corrupt = encode(tok, row["clean_story"], eos=False), encode(tok, row["corrupt_story"], eos=False)
        assert len(clean) == len(corrupt), "token-aligned"
        differ = [p for p, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        cut = len(row["clean_tokens"])
        assert len(row["corrupt_tokens"]) == cut
        assert row["clean_tokens"] == clean[:cut] and row["corrupt_tokens"] == corrupt[:cut]
        assert row["positions"] == [p for p in differ if p < cut] and row["positions"]
        assert (row["clean_answer"], row["corrupt_answer"]) == (clean[cut], corrupt[cut])
        assert row["clean_answer"] != row["corrupt_answer"]
        first_value = row["clean_value"].split(" / ")[0]
        if factor in ("name", "friend"):  # the answer is the name's first token
            assert row["clean_answer"] == encode(tok, first_value, eos=False)[0]


@pytest.mark.parametrize("factor", pairs.LABEL_FACTORS)
def test_label_pairs_change_the_label_and_keep_the_cast(monkeypatch, factor):
    rows = pairs.pairs(factor, 6, seed=7)
    for row in rows:
        index = int(row["generation_id"].split("-")[2])
        clean = synth.story(7, index)
        assert row["clean_story"] == clean["story"] and row["clean_value"] == clean[factor]
        assert row["corrupt_value"] not in ("", row["clean_value"]) and row["corrupt_value"] in pairs.label_values(
            factor
        )
        cast = synth.story_cast(row["generation_id"])
        for slot in ("hero", "friend"):  # the same people, whatever the plot
            assert cast[slot] in row["corrupt_story"]
        if factor in ("theme", "style"):
            # Their plans draw as many random numbers whatever the value, so the generator itself, given the other
            # label, writes exactly the corrupt story: the pair differs in nothing else.
            draw = synth.sample_labels
            monkeypatch.setattr(synth, "sample_labels", lambda rng: draw(rng) | {factor: row["corrupt_value"]})  # noqa: B023
            assert synth.story(7, index)["story"] == row["corrupt_story"]
            monkeypatch.setattr(synth, "sample_labels", draw)


def test_pairs_are_reproducible_and_written_atomically(tok, tmp_path):
    a = pairs.pairs("name", 5, seed=3, tokenizer=tok)
    assert a == pairs.pairs("name", 5, seed=3, tokenizer=tok)
    path = pairs.write_pairs(tmp_path / "p.parquet", a)
    table = pq.read_table(path)
    assert table.num_rows == 5 and {"theme", "topic", "style", "positions", "clean_answer"} <= set(table.column_names)
    assert list(tmp_path.iterdir()) == [path]


def test_bad_factors_and_values_are_one_line():
    with pytest.raises(SSLensError, match="factors are: name, friend, pronoun"):
        pairs.pairs("colour", 2)
    with pytest.raises(SSLensError, match="no theme 'Gloom'; valid: Friendship"):
        pairs.pairs("theme", 2, value="Gloom")
    with pytest.raises(SSLensError, match="needs a tokenizer"):
        pairs.pairs("name", 2)
    out = subprocess.run(
        [sys.executable, "-m", "sslens", "data", "pairs", "--factor", "colour", "--out", "x.parquet"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "factors are" in out.stderr
