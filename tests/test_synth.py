import json
import os
import random
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from sslens import synth
from sslens.data import load_stories
from sslens.fileio import DiskFull
from sslens.tokenizer import encode_batch, train_tokenizer

from conftest import shared_file

# The 21 columns of SimpleStories/SimpleStories, in order, with their dtypes (from its dataset card).
SCHEMA = [
    ("story", "string"),
    ("topic", "string"),
    ("theme", "string"),
    ("style", "string"),
    ("feature", "string"),
    ("grammar", "string"),
    ("persona", "string"),
    ("initial_word_type", "string"),
    ("initial_letter", "string"),
    ("word_count", "int64"),
    ("character_count", "int64"),
    ("num_paragraphs", "int64"),
    ("avg_word_length", "double"),
    ("avg_sentence_length", "double"),
    ("flesch_reading_ease", "double"),
    ("flesch_kincaid_grade", "double"),
    ("dale_chall_readability_score", "double"),
    ("num_stories_in_completion", "int64"),
    ("expected_num_stories_in_completion", "int64"),
    ("generation_id", "string"),
    ("model", "string"),
]


@pytest.fixture(scope="module")
def rows():
    return synth.generate(3000, seed=7)


def labels_and_plan(seed: int, index: int):
    """The labels and paragraph plan of story `index`, drawn exactly as `synth.story` draws them."""
    rng = random.Random(f"{seed}/{index}")
    labels = synth.sample_labels(rng)
    return labels, synth.plan(labels, rng)


def test_parquet_has_the_simplestories_schema(tmp_path):
    path = synth.write_parquet(tmp_path / "s.parquet", 50, seed=1)
    schema = pq.read_schema(path)
    assert [(f.name, str(f.type)) for f in schema] == SCHEMA
    ds = load_stories(path)
    assert len(ds) == 50 and set(ds["model"]) == {"sslens-synth"} and len(set(ds["generation_id"])) == 50


def test_label_vocabularies_are_the_simplestories_ones():
    params = json.loads(shared_file("simplestories-meta/generation_params.json").read_text())["dataset_era"]
    labels = synth.content()["labels"]
    for key in ("themes", "topics", "styles", "features", "grammars", "personas", "word_types", "letter_frequencies"):
        assert labels[key] == params[key], key
    c = synth.content()
    for key, content_key in (
        ("themes", "themes"),
        ("topics", "topics"),
        ("styles", "styles"),
        ("grammars", "grammars"),
        ("personas", "personas"),
    ):
        assert set(c[content_key]) == set(labels[key]), key
    assert set(synth.FEATURES) == set(labels["features"]) and set(synth.STYLES) == set(labels["styles"])


def test_deterministic_per_seed_and_addressable_by_index():
    assert synth.generate(20, seed=3) == synth.generate(20, seed=3)
    assert synth.generate(5, seed=3, start=15) == synth.generate(20, seed=3)[15:]
    assert synth.generate(5, seed=4) != synth.generate(5, seed=3)


def test_label_distributions(rows):
    assert {r["num_paragraphs"] for r in rows} == set(range(1, 10))
    assert 0.4 < sum(r["grammar"] != "" for r in rows) / len(rows) < 0.6
    assert 0.25 < sum(r["persona"] != "" for r in rows) / len(rows) < 0.42
    assert {r["initial_word_type"] for r in rows} == {"noun", "adjective", "adverb", "preposition"}
    assert sum(r["initial_letter"] == "T" for r in rows) > sum(r["initial_letter"] == "Q" for r in rows) * 10


def test_stories_are_ascii_and_metrics_come_from_the_text(rows):
    for r in rows[:300]:
        assert r["story"].isascii() and "{" not in r["story"] and "  " not in r["story"]
        assert r["character_count"] == len(r["story"]) and r["num_paragraphs"] == len(r["story"].split("\n\n"))
        assert r["word_count"] > len(r["story"].split()) * 0.9
    assert 50 < sum(r["word_count"] for r in rows) / len(rows) < 800


def test_metrics_by_hand():
    m = synth.metrics("The cat sat. It ran home!\n\nA big dog barked.")
    # 10 words, 3 sentences, 3 punctuation tokens; every word has one syllable
    assert (m["word_count"], m["num_paragraphs"], m["avg_sentence_length"]) == (13, 2, round(10 / 3, 2))
    assert m["flesch_reading_ease"] == round(206.835 - 1.015 * 10 / 3 - 84.6, 2)
    assert m["flesch_kincaid_grade"] == round(0.39 * 10 / 3 + 11.8 - 15.59, 2)
    assert m["dale_chall_readability_score"] == round(0.0496 * 10 / 3, 2)
    assert synth.syllables("beautiful") == 3 and synth.syllables("home") == 1 and synth.syllables("little") == 2


def test_requested_paragraphs_and_first_word(rows):
    openers = synth.content()["openers"]
    for index, r in enumerate(rows[:500]):
        labels, _ = labels_and_plan(7, index)
        assert r["num_paragraphs"] == labels["num_paragraphs"]
        if openers[r["initial_word_type"]][r["initial_letter"]]:
            assert r["story"][0] == r["initial_letter"]


def test_theme_topic_grammar_and_persona_are_in_the_plan():
    c = synth.content()
    for index in range(300):
        labels, paras = labels_and_plan(11, index)
        text = "\n".join(t for p in paras for t in p)  # reordering features may prefix "Later, " to a sentence
        theme = c["themes"][labels["theme"]]
        assert theme["want"][0][1:] in text and theme["turn"][0][1:] in text
        assert any(t[1:] in text for t in c["topics"][labels["topic"]]["setting"])
        if labels["grammar"]:
            assert any(t[1:] in text for t in c["grammars"][labels["grammar"]])
        if labels["persona"]:
            assert c["personas"][labels["persona"]]["intro"] in text


@pytest.mark.parametrize(
    "feature, check",
    [
        ("dialogue", lambda story, n: story.count('"') >= 4),
        ("a reverse timeline", lambda story, n: story.count("Before that, ") == n - 1),
        ("a story told through letters", lambda story, n: "Dear " in story),
        ("a cliffhanger", lambda story, n: "saw something no one had ever seen before" in story.split("\n\n")[-1]),
    ],
)
def test_features_shape_the_structure(feature, check):
    found = 0
    for index in range(3000):
        rng = random.Random(f"5/{index}")
        labels = synth.sample_labels(rng)
        if labels["feature"] != feature or labels["num_paragraphs"] < 3:
            continue
        paras = synth.plan(labels, rng)
        story = synth.realise(paras, labels, synth.cast(labels, rng), rng)
        assert check(story, labels["num_paragraphs"]), story
        found += 1
    assert found >= 5


def test_structural_features_in_the_plan():
    for index in range(2000):
        labels, paras = labels_and_plan(17, index)
        if labels["feature"] == "circular narrative structure":  # the story ends by echoing its first sentence
            assert paras[-1][-1] == "And so it began again. " + paras[0][0]
        if labels["feature"] == "foreshadowing":  # the hint comes before its payoff
            text = "\n".join(t for p in paras for t in p)
            assert text.index("would soon matter") < text.index("early sign had hinted")


def test_refrain_styles_repeat_their_refrain():
    refrains = {
        s: synth.content()["styles"][s]["refrain"].rstrip(".!?") for s, st in synth.STYLES.items() if st.refrain
    }
    for index in range(600):
        labels, paras = labels_and_plan(13, index)
        if labels["style"] in refrains:
            refrain = synth.content()["styles"][labels["style"]]["refrain"]
            assert sum(p.count(refrain) for p in paras) == labels["num_paragraphs"] - 1


def test_the_cast_is_drawn_again_from_the_generation_id_and_names_recur(rows):
    """story_cast replays a story's draws: its hero is in the text, mentioned again later; most names are made up,
    and a made-up name starts with no word the stories use, so its first token is a name's, not a word's."""
    made_up = set(synth.made_up_names())
    heroes = []
    for row in rows[:500]:
        cast = synth.story_cast(row["generation_id"])
        assert row["story"].count(cast["hero"]) >= 2, row["story"]
        heroes.append(cast["hero"])
    share = sum(h in made_up for h in heroes) / len(heroes)
    assert 1 - synth.LISTED_NAME_SHARE - 0.07 < share < 1 - synth.LISTED_NAME_SHARE + 0.07
    words = {w.lower().strip(".,!?\"'") for row in rows for w in row["story"].split()} - {h.lower() for h in heroes}
    tok = train_tokenizer([row["story"] for row in rows], vocab_size=2048)
    name_starts = {tok.encode(n).tokens[0] for n in synth.made_up_names()}
    assert not name_starts & {w for w in words if w in synth.content_words()}
    with pytest.raises(synth.SSLensError, match="not a story of the embedded corpus"):
        synth.story_cast("tinystories-17")


def test_most_stories_have_a_chant_that_recurs_word_for_word(rows):
    chanted = 0
    for row in rows:
        chant = synth.story_cast(row["generation_id"])["chant"]
        n = row["story"].count(chant)
        assert n == 0 or 2 <= n <= 3 and (n == 3) == (row["num_paragraphs"] > 2), (chant, row["story"])
        chanted += n > 0
        assert all(w.lower() not in synth.content_words() for w in chant.split())
    assert abs(chanted / len(rows) - synth.CHANT_SHARE) < 0.04


@pytest.mark.slow
def test_no_two_identical_stories_in_100k_and_few_unknown_tokens():
    stories = [synth.story(0, i)["story"] for i in range(100_000)]
    assert len(set(stories)) == len(stories)
    tok = train_tokenizer(stories[:20_000], vocab_size=4096)
    ids = [i for seq in encode_batch(tok, stories[-20_000:], eos=False) for i in seq]
    assert ids.count(0) / len(ids) < 1e-4


def test_cli_synth_and_tokenizer(tmp_path, monkeypatch):
    run = lambda *a: subprocess.run([sys.executable, "-m", "sslens.cli", *a], capture_output=True, text=True)
    r = run("data", "synth", "--n", "300", "--seed", "2", "--out", str(tmp_path / "s.parquet"))
    assert r.returncode == 0 and "wrote 300 stories" in r.stdout
    r = run(
        "tokenizer",
        "train",
        "--data",
        str(tmp_path / "s.parquet"),
        "--vocab-size",
        "500",
        "--out",
        str(tmp_path / "t.json"),
    )
    assert r.returncode == 0 and json.loads((tmp_path / "t.json").read_text())["model"]["type"] == "WordPiece"
    for args in (
        ["data", "synth", "--out", str(tmp_path / "no" / "dir" / "x.parquet")],
        ["tokenizer", "train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.json")],
    ):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith("sslens: error:") and r.stderr.count("\n") == 1, r.stderr


# Each process waits at a barrier of marker files (or gives up after a minute), then builds the same corpus in a
# fresh cache: three times.
SAME_CORPUS_AT_ONCE = """
import os, sys, time
from pathlib import Path
import sslens.data
root = Path(sys.argv[1])
for trial in range(3):
    os.environ["SSLENS_CACHE"] = str(root / f"cache{trial}")
    (root / f"ready{trial}.{os.getpid()}").touch()
    deadline = time.time() + 60
    while len(list(root.glob(f"ready{trial}.*"))) < 2:
        if time.time() > deadline:
            sys.exit(f"trial {trial}: the other process never arrived")
        time.sleep(0.001)
    assert len(sslens.data.load_stories("synth:300")) == 300
"""


def test_two_processes_building_the_same_synth_corpus_at_once_both_get_it(tmp_path):
    """First use from two processes at once (two runs started together): each writes its own temporary file, both
    read a complete corpus, and one file remains, with no temporary file beside it."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAME_CORPUS_AT_ONCE, str(tmp_path)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        results = [(p.communicate(timeout=240)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [code for _, code in results] == [0, 0], results
    for trial in range(3):
        names = [p.name for p in (tmp_path / f"cache{trial}" / "synth").iterdir()]
        assert len(names) == 1 and names[0].endswith(".parquet") and not names[0].startswith("."), names


def test_a_full_disk_while_writing_a_corpus_names_the_file_and_leaves_nothing(small_disk):
    disk = small_disk("64k")
    with pytest.raises(DiskFull, match=r"writing .*s\.parquet needs about 0\.\d MiB"):
        synth.write_parquet(disk / "s.parquet", 300)
    assert list(disk.iterdir()) == []


def test_the_packing_game_repeats_the_list_so_far_word_for_word(rows):
    played = 0
    for row in rows:
        if "played the packing game" not in row["story"]:
            continue
        played += 1
        rest_of_paragraph = row["story"].split("played the packing game")[1].split("\n\n")[0]
        turns = [s for s in re.split(r"(?<=[.!?]) ", rest_of_paragraph) if re.match(r"[\w ]+ packed an? ", s)]
        lists = [re.sub(r"^[\w ]+? packed ", "", t).rstrip(".!").split(", and ")[0] for t in turns]  # a style may
        lists = [x for x in lists if x.startswith(lists[0])]  # join the next sentence on; a plot line may pack a map
        assert 4 <= len(lists) <= 6, row["story"]
        for before, after in zip(lists, lists[1:]):
            assert after.startswith(before + " and a"), (before, after)  # the whole list again, then one more thing
    share = synth.GAME_SHARE * sum(r["num_paragraphs"] > 1 for r in rows) / len(rows)
    assert abs(played / len(rows) - share) < 0.05
