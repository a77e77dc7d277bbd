"""Counterfactual story pairs: two stories of the embedded corpus identical in every random choice but one factor.

A slot factor (the hero's name, the friend's name, the hero's pronoun, the object, the creature, the place) gets a
new value of the same token count under the given tokenizer, so the two stories are token-aligned, and each pair
is cut right before a later mention of the slot: the clean and the corrupt prompt end where the model must recall
the value from context, with the clean and the counterfactual answer token for a logit-difference metric.
A label factor (theme, topic, style, feature, grammar, persona) changes the label before the plot is planned; the
names, places and things stay, and the stories are not aligned (their plots differ in length).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers

from . import synth
from .data import tokenizer_hash
from .errors import SSLensError
from .fileio import atomic_write_bytes
from .tokenizer import encode

SLOT_FACTORS = ("name", "friend", "pronoun", "object", "creature", "place")
LABEL_FACTORS = ("theme", "topic", "style", "feature", "grammar", "persona")
FACTORS = SLOT_FACTORS + LABEL_FACTORS
TOPIC_SLOTS = ("place", "thing", "a_thing", "creature", "a_creature")
TRIES = 40  # counterfactual values tried per story before the story is passed over


def check_factor(factor: str, value: str | None = None) -> None:
    """One line naming the valid factors, or the valid values of a label factor."""
    if factor not in FACTORS:
        raise SSLensError(f"unknown factor {factor!r}; the generator's factors are: {', '.join(FACTORS)}")
    if value is not None:
        if factor not in LABEL_FACTORS:
            raise SSLensError(f"a value can be chosen for a label factor ({', '.join(LABEL_FACTORS)}), not {factor!r}")
        valid = label_values(factor)
        if value not in valid:
            raise SSLensError(f"the generator has no {factor} {value!r}; valid: {', '.join(valid)}")


def label_values(factor: str) -> list[str]:
    return synth.content()["labels"][factor + "s"]


def drawn(seed: int, index: int) -> tuple[dict, list[list[str]], dict, tuple]:
    """Story `index`'s labels, plan, slots and the random state realise() starts from, drawn as `synth.story`."""
    rng = random.Random(f"{seed}/{index}")
    labels = synth.sample_labels(rng)
    paras = synth.plan(labels, rng)
    slots = synth.cast(labels, rng)
    return labels, paras, slots, rng.getstate()


def realised(paras: list[list[str]], labels: dict, slots: dict, state: tuple) -> str:
    rng = random.Random()
    rng.setstate(state)
    return synth.realise(paras, labels, slots, rng)


def slot_alternatives(factor: str, labels: dict, slots: dict, rng: random.Random) -> list[dict[str, str]]:
    """Slot updates the generator could have drawn instead, in a random order. A listed name keeps its pronoun, so
    a pronoun pair needs a hero with a made-up name (whose pronoun the generator draws)."""
    topic = synth.content()["topics"][labels["topic"]]
    if factor in ("name", "friend"):
        key = "hero" if factor == "name" else "friend"
        taken = (slots["hero"], slots["friend"])
        pronoun = slots["he"] if key == "hero" else None  # the friend's pronoun is never used
        fits = [n for n in synth.all_names() if n not in taken and synth.NAMES.get(n, pronoun) == pronoun]
        values = [{key: n} for n in rng.sample(fits, min(TRIES, len(fits)))]
    elif factor == "pronoun":
        other = "she" if slots["he"] == "he" else "he"
        he, him, his = synth.PRONOUNS[other]
        listed = slots["hero"] in synth.NAMES
        values = [] if listed else [{"he": he, "him": him, "his": his, "He": he.title(), "His": his.title()}]
    elif factor in ("object", "creature"):
        key, pool = ("thing", topic["things"]) if factor == "object" else ("creature", topic["creatures"])
        values = [{key: "the " + x, "a_" + key: synth.article(x)} for x in pool if "the " + x != slots[key]]
    else:
        values = [{"place": x} for x in topic["places"] if x != slots["place"]]
    rng.shuffle(values)
    return values[:TRIES]


def mentions(differ: list[int]) -> list[int]:
    """The first position of each run of consecutive differing positions: where each mention of the slot starts."""
    return [p for i, p in enumerate(differ) if i == 0 or differ[i - 1] != p - 1]


def first_tokens_differ(tok: tokenizers.Tokenizer, slots: dict, change: dict) -> bool:
    """A name pair's answer is the name's first token, not a later one that two names happen not to share."""
    return all(encode(tok, slots[k], eos=False)[0] != encode(tok, v, eos=False)[0] for k, v in change.items())


def slot_pair(tok: tokenizers.Tokenizer, factor: str, seed: int, index: int) -> dict | None:
    """Story `index` and its counterfactual, cut before the second mention of the slot; None if no value of the
    same token count exists or the slot is mentioned once."""
    labels, paras, slots, state = drawn(seed, index)
    clean_text = realised(paras, labels, slots, state)
    clean = encode(tok, clean_text, eos=False)
    for change in slot_alternatives(factor, labels, slots, random.Random(f"{seed}/{index}/{factor}")):
        corrupt_text = realised(paras, labels, slots | change, state)
        corrupt = encode(tok, corrupt_text, eos=False)
        if len(corrupt) != len(clean):
            continue
        differ = [p for p, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        starts = mentions(differ)
        if len(starts) < 2 or (factor in ("name", "friend") and not first_tokens_differ(tok, slots, change)):
            continue
        cut = starts[1]
        return {
            "factor": factor,
            "generation_id": f"synth-{seed}-{index}",
            "clean_value": " / ".join(slots[k] for k in change),
            "corrupt_value": " / ".join(change.values()),
            "clean_story": clean_text,
            "corrupt_story": corrupt_text,
            "clean_tokens": clean[:cut],
            "corrupt_tokens": corrupt[:cut],
            "positions": [p for p in differ if p < cut],
            "clean_answer": clean[cut],
            "corrupt_answer": corrupt[cut],
            "tokenizer_hash": tokenizer_hash(tok),
            **{k: labels[k] for k in LABEL_FACTORS},
        }
    return None


def label_pair(factor: str, seed: int, index: int, value: str | None = None) -> dict | None:
    """Story `index` and the story with its `factor` label changed (to `value`, else to another value drawn for
    the pair), planned from the same random state and filled with the same slots; None if it already has `value`
    or has no such label (half the stories have no grammar label, two thirds no persona)."""
    rng = random.Random(f"{seed}/{index}")
    labels = synth.sample_labels(rng)
    start = rng.getstate()
    others = [v for v in label_values(factor) if v != labels[factor]]
    new = value if value is not None else random.Random(f"{seed}/{index}/{factor}").choice(others)
    if new == labels[factor] or not labels[factor]:  # both sides have a value (no grammar or persona is not one)
        return None
    changed = labels | {factor: new}
    clean_paras = synth.plan(labels, rng)
    cast_from = rng.getstate()
    slots = synth.cast(labels, rng)
    state = rng.getstate()
    rng.setstate(start)
    corrupt_paras = synth.plan(changed, rng)
    corrupt_slots = dict(slots)
    if factor == "topic":  # a topic's places and things are its own: the other topic's, drawn as the clean ones
        rng.setstate(cast_from)
        corrupt_slots |= {k: v for k, v in synth.cast(changed, rng).items() if k in TOPIC_SLOTS}
    return {
        "factor": factor,
        "generation_id": f"synth-{seed}-{index}",
        "clean_value": labels[factor],
        "corrupt_value": new,
        "clean_story": realised(clean_paras, labels, slots, state),
        "corrupt_story": realised(corrupt_paras, changed, corrupt_slots, state),
        **{k: labels[k] for k in LABEL_FACTORS},
    }


def pairs(
    factor: str,
    n: int,
    seed: int = 0,
    tokenizer: tokenizers.Tokenizer | None = None,
    value: str | None = None,
    max_tokens: int | None = None,
) -> list[dict]:
    """`n` pairs for `factor` from consecutive stories of the corpus for `seed` (stories without a fitting
    counterfactual, or whose prompt is over `max_tokens`, are passed over). Slot factors need the tokenizer the
    pairs must be aligned under."""
    check_factor(factor, value)
    if factor in SLOT_FACTORS and tokenizer is None:
        raise SSLensError(f"a {factor} pair is token-aligned, so it needs a tokenizer (a run directory or file)")
    out, index = [], 0
    while len(out) < n:
        if index >= 100 * n + 1000:
            raise SSLensError(f"only {len(out)} of {n} {factor} pairs found in {index} stories")
        pair = (
            slot_pair(tokenizer, factor, seed, index)
            if factor in SLOT_FACTORS
            else label_pair(factor, seed, index, value)
        )
        if pair is not None and (max_tokens is None or len(pair.get("clean_tokens", ())) <= max_tokens):
            out.append(pair | {"pair": len(out)})
        index += 1
    return out


def write_pairs(path: str | Path, rows: list[dict]) -> Path:
    """The pairs as parquet, written atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SSLensError(f"output directory {path.parent} does not exist")
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())
    return path


def read_pairs(path: str | Path, tok: tokenizers.Tokenizer) -> list[dict]:
    """A pairs file's rows, refused unless they are slot pairs aligned under `tok` (their token ids mean nothing
    under another tokenizer)."""
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
        raise SSLensError(f"{path} is not a pairs file ({str(e).splitlines()[0][:120]})") from None
    if not rows or "clean_tokens" not in rows[0]:
        raise SSLensError(f"{path} holds no slot pairs (patching needs name, friend, pronoun, ... pairs)")
    if {r["tokenizer_hash"] for r in rows} != {tokenizer_hash(tok)}:
        raise SSLensError(f"{path} was made with another tokenizer; make it with --tokenizer set to this run")
    return rows
