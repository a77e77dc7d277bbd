"""The embedded corpus: procedurally generated children's stories in the SimpleStories schema (21 columns).

Every label shapes the text. The theme gives the plot (want, obstacle, turn, ending, moral) and who is in it; the
topic the setting, objects, creatures and middle events; the style the sentence shapes (joined or short sentences,
exclamations, questions, refrains) and its own atmosphere lines; the feature a narrative device, mostly structural
(quoted dialogue, reordered or reversed paragraphs, an echo of the first sentence, an early hint that pays off, an
unresolved ending, ...); the grammar, when set, sentences that use it; the persona, when set, a first-person
narrator. The first sentence starts with a word of the requested type and letter when a simple word exists
(otherwise with a word of that type), and the story has the requested number of paragraphs. One hero, one friend,
one place, one object and one creature recur throughout, so entity tracking and induction can be learned.

The label vocabularies are those of SimpleStories (labels.json); the sentences are in the YAML files beside it.
Stories are plain ASCII; word counts and readability figures are computed from the text.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..errors import SSLensError
from ..fileio import atomic_replace, temporary_path, writing

MODEL = "sslens-synth"
LABEL_COLUMNS = ["topic", "theme", "style", "feature", "grammar", "persona", "initial_word_type", "initial_letter"]

# The names SimpleStories asked for, and names made of common words (as its prompt allowed), with pronouns.
NAMES = {
    "Mia": "she",
    "Alex": "he",
    "Jean": "she",
    "Samuel": "he",
    "Lily": "she",
    "Leo": "he",
    "Jose": "he",
    "Kim": "she",
    "Alice": "she",
    "Lena": "she",
    "Rita": "she",
    "Emmanuel": "he",
    "Anne": "she",
    "Peter": "he",
    "Maria": "she",
    "Luis": "he",
    "Blue Star": "she",
    "Little Pebble": "he",
    "Sunny Day": "she",
    "Brave Oak": "he",
    "Red Leaf": "she",
    "Tall Pine": "he",
    "Bright Moon": "she",
    "Quick River": "he",
}
NAME_LIST = list(NAMES)
# Most heroes and friends get a made-up name of two syllables and an optional ending (about 20,000 of them, each in
# about two stories of a 20k corpus): too many to memorise, so a later mention of a name can only be predicted by
# copying it from earlier in the story, which is what induction heads do. A fifth keep a name from the list above.
# Most stories also have a chant of made-up words that recurs two or three times, word for word (copying again), some
# quoted and some not, and many a round of the packing game, where each player repeats the whole list so far and
# adds a thing: random things (or made-up ones) said again and again, in an order only copying predicts.
ONSETS, VOWELS, ENDINGS = "bdfghjklmnprstvz", "aeiou", ("", "n", "l", "r")
LISTED_NAME_SHARE = 0.2
CHANT_SHARE = 0.8
GAME_SHARE = 0.6
GAME_INTRO = "{hero} and {friend} played the packing game."
GAME_TURN = "{player} packed {things}."
CHANT_INTRO = [
    '{friend} taught {hero} a secret chant: "{chant}!"',
    'On the old door were the magic words "{chant}."',
    'Every night, {hero} sang a little song that went "{chant}."',
    "The old map had strange words on it: {chant}.",
    "{friend} wrote a silly rhyme for {hero}: {chant}.",
]
CHANT_USE = [
    '{hero} whispered "{chant}," and {he} felt brave again.',
    '"{chant}!" {hero} said, just like before.',
    'Then everyone sang "{chant}" together, and {place} felt warm.',
    "{hero} said the strange words once more: {chant}.",
    "Far away, someone called out {chant} and laughed.",
]
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}
CAST = {
    "pair": "{hero} had a good friend named {friend}.",
    "group": "{hero} and {friend} had many friends in {place}.",
    "rival": "{friend} always wanted to beat {hero} at everything.",
    "solo": "{hero} liked to do things alone.",
}


@dataclass(frozen=True)
class Style:
    join: float  # chance that a sentence is joined to the previous one with ", and"
    exclaim: float  # chance that a statement ends in "!"
    question: float  # chance per paragraph of a wondering question
    refrain: bool  # repeat the style's refrain at paragraph ends


STYLES = {
    "whimsical": Style(0.3, 0.3, 0.05, False),
    "playful": Style(0.2, 0.4, 0.1, True),
    "epic": Style(0.6, 0.15, 0, False),
    "fairy tale-like": Style(0.4, 0.05, 0, False),
    "modern": Style(0.15, 0.05, 0.05, False),
    "classic": Style(0.5, 0, 0, False),
    "lyric": Style(0.4, 0, 0, True),
    "mythological": Style(0.6, 0.05, 0, False),
    "lighthearted": Style(0.3, 0.2, 0.05, False),
    "adventurous": Style(0.3, 0.3, 0, False),
    "heartwarming": Style(0.4, 0.1, 0, False),
    "humorous": Style(0.2, 0.35, 0.1, False),
    "mystical": Style(0.5, 0, 0.1, False),
    "action-packed": Style(0, 0.5, 0, False),
    "fable-like": Style(0.4, 0, 0, False),
    "surreal": Style(0.4, 0.1, 0.15, True),
    "philosophical": Style(0.4, 0, 0.4, False),
    "melancholic": Style(0.5, 0, 0.05, True),
    "noir": Style(0, 0, 0.1, False),
    "romantic": Style(0.5, 0.05, 0, True),
    "tragic": Style(0.4, 0, 0, False),
    "minimalist": Style(0, 0, 0, False),
    "suspenseful": Style(0, 0.2, 0.25, False),
}
QUESTIONS = [
    "Who could say why?",
    "What would happen next?",
    "Was it really so simple?",
    "Why does the world work like this?",
    "How could anyone know?",
]
# First words that may be lowercased when a sentence is joined onto the one before it.
JOINABLE = {"The", "A", "An", "He", "She", "It", "They", "Then", "Soon", "Everyone", "Nobody", "Some", "All", "There"}


@functools.cache
def content() -> dict:
    files = resources.files(__name__)
    c = {
        name: yaml.safe_load(files.joinpath(f"{name}.yaml").read_text())
        for name in ("themes", "topics", "styles", "grammars", "personas", "openers")
    }
    c["labels"] = json.loads(files.joinpath("labels.json").read_text())
    return c


def sample_labels(rng: random.Random) -> dict:
    """Labels drawn as SimpleStories drew its prompts: uniform theme/topic/style/feature/word type, grammar for
    half the stories, persona for a third, first letters by English frequency, 1 to 9 paragraphs."""
    labels = content()["labels"]
    letters, cum_weights = _letters()
    return {
        "topic": rng.choice(labels["topics"]),
        "theme": rng.choice(labels["themes"]),
        "style": rng.choice(labels["styles"]),
        "feature": rng.choice(labels["features"]),
        "grammar": rng.choice(labels["grammars"]) if rng.random() < 0.5 else "",
        "persona": rng.choice(labels["personas"]) if rng.random() < 1 / 3 else "",
        "initial_word_type": rng.choice(labels["word_types"]).split(" ", 1)[1],
        "initial_letter": rng.choices(letters, cum_weights=cum_weights)[0],
        "num_paragraphs": rng.randint(1, 9),
    }


@functools.cache
def _letters() -> tuple[list[str], list[float]]:
    letters, weights = zip(*content()["labels"]["letter_frequencies"].items())
    return list(letters), list(itertools.accumulate(weights))


@functools.cache
def content_words() -> frozenset[str]:
    """Every word the generator's sentences and listed names use, lowercased."""
    words: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, str):
            words.update(w.lower() for w in re.findall(r"[A-Za-z]+", x))
        elif isinstance(x, dict | list):
            for v in x.values() if isinstance(x, dict) else x:
                walk(v)

    walk(
        [content()[k] for k in ("themes", "topics", "styles", "grammars", "personas", "openers")]
        + NAME_LIST
        + CHANT_INTRO
        + CHANT_USE
        + list(CAST.values())
        + QUESTIONS
    )
    return frozenset(words)


def _made_up(word: str) -> bool:
    """No beginning of the word (two letters or more) is a word of the corpus, so its first token is never a word
    the stories use elsewhere ("Hemo" would start with "he", "Sunu" with "sun")."""
    return not any(word[:k].lower() in content_words() for k in range(2, len(word) + 1))


@functools.cache
def _syllables() -> list[str]:
    return [onset + vowel for onset in ONSETS for vowel in VOWELS]


@functools.cache
def made_up_names() -> tuple[str, ...]:
    names = ((a + b + end).capitalize() for a in _syllables() for b in _syllables() for end in ENDINGS)
    return tuple(name for name in names if _made_up(name))


@functools.cache
def chant_words() -> tuple[str, ...]:
    words = _syllables() + [a + b for a in _syllables() for b in _syllables()]
    return tuple(word for word in words if _made_up(word))


def chant(rng: random.Random) -> str:
    """Four to six made-up words, like "Ka lomi zu bafe"."""
    return " ".join(rng.choices(chant_words(), k=rng.randint(4, 6))).capitalize()


@functools.cache
def game_things() -> tuple[str, ...]:
    """What the packing game packs: every thing and creature of every topic."""
    return tuple(sorted({x for tp in content()["topics"].values() for x in tp["things"] + tp["creatures"]}))


def packing_game(rng: random.Random) -> list[str]:
    """The game's sentences: four to six turns, each the list so far (word for word) and one more thing, about a
    third of them made-up ("a zupi")."""
    things = [article(rng.choice(chant_words() if rng.random() < 1 / 3 else game_things())) for _ in range(6)]
    return [GAME_INTRO] + [
        GAME_TURN.format(player="{hero}" if turn % 2 == 0 else "{friend}", things=" and ".join(things[: turn + 1]))
        for turn in range(rng.randint(4, 6))
    ]


def all_names() -> tuple[str, ...]:
    """Every name a hero or friend can have."""
    return tuple(NAME_LIST) + made_up_names()


def _name(rng: random.Random) -> tuple[str, str]:
    """A name and its pronoun ("he" or "she")."""
    if rng.random() < LISTED_NAME_SHARE:
        name = rng.choice(NAME_LIST)
        return name, NAMES[name]
    return rng.choice(made_up_names()), rng.choice(("he", "she"))


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _opener(labels: dict, rng: random.Random) -> str:
    by_letter = content()["openers"][labels["initial_word_type"]]
    choices = by_letter[labels["initial_letter"]] or [s for ss in by_letter.values() for s in ss]
    return rng.choice(choices)


# ---- narrative features: each edits the paragraph plan (lists of sentence templates) in place -------------------
def _middle(paras: list[list[str]]) -> list[str]:
    return paras[len(paras) // 2]


def _at_start(p: list[list[str]], para: list[str], sentence: str) -> None:
    """Put `sentence` first in `para`; in the first paragraph, whose opener must stay first, put it last."""
    para.append(sentence) if para is p[0] else para.insert(0, sentence)


def _say(line: str, who: str) -> str:
    verb = "asked" if line.endswith("?") else "shouted" if line.endswith("!") else "said"
    return f'"{line[:-1]}," {verb} {who}.' if line.endswith(".") else f'"{line}" {verb} {who}.'


def _dialogue(p, th, rng):
    _middle(p).append(_say(th["say"][0], "{hero}"))
    _middle(p).append(_say(th["say"][1], "{friend}"))


def _prefix(marker: str, template: str) -> str:
    """`marker` ("Later, ") put before a sentence template, whose first word is then no longer capitalised."""
    for slot in ("{He}", "{His}"):
        if template.startswith(slot):
            return marker + slot.lower() + template[len(slot) :]
    return marker + (
        template if template[0] == "{" or template.startswith("I ") else template[0].lower() + template[1:]
    )


def _reorder(p, rng, reverse: bool):
    """Paragraphs after the first in reverse or shuffled order, each opened by a time marker."""
    middle = p[1:]
    middle.reverse() if reverse else rng.shuffle(middle)
    for para in middle:
        para[0] = _prefix(
            "Before that, " if reverse else rng.choice(["Later, ", "Much earlier, ", "Some time before, "]), para[0]
        )
    p[1:] = middle
    p[0].insert(
        1, "This story is told from its end back to its start." if reverse else "This story is not told in order."
    )


def _cliffhanger(p, th, rng):
    """The story stops before its resolution: the theme's ending is replaced by a moment of suspense."""
    p[-1][:] = [t for t in p[-1] if t not in th["end"] and t not in th["moral"]]
    p[-1].append("Then the ground shook, and {hero} saw something no one had ever seen before.")


FEATURES: dict[str, Callable] = {
    "dialogue": _dialogue,
    "in medias res": lambda p, th, rng: (
        p[0].insert(1, th["turn"][0]),
        p[0].insert(2, "But that was later. It all began like this."),
    ),
    "a moral lesson": lambda p, th, rng: p[-1].append("The moral of the story is simple. " + th["moral"][0]),
    "absence indicating a presence": lambda p, th, rng: (
        p[0].append("Someone had left {a_thing} by the door, but nobody was there."),
        p[-1].append("Only {friend} could have left {thing} there, quiet as a shadow."),
    ),
    "a story told through letters": lambda p, th, rng: (
        p[0].insert(1, "Dear {friend}, I must write to you about what happened."),
        p[-1].append("Your friend always, {hero}."),
    ),
    "a twist ending": lambda p, th, rng: p[-1].append(
        rng.choice(
            [
                "But then {hero} woke up, and it had all been a dream.",
                "And the biggest surprise of all was that {friend} had known everything from the start.",
            ]
        )
    ),
    "an unrealiable narrater": lambda p, th, rng: (
        p[0].insert(1, "I was there, and I remember it all very well, I think."),
        _middle(p).append("Or maybe it was the other way around. I am not so sure."),
        p[-1].append("At least, that is how I tell it."),
    ),
    "foreshadowing": lambda p, th, rng: (
        p[0].append("{hero} did not know it yet, but {thing} would soon matter a lot."),
        _at_start(p, p[-1], "Just as the early sign had hinted, {thing} made all the difference."),
    ),
    "irony": lambda p, th, rng: (
        p[0].append("{hero} said {he} would never, ever need {thing}."),
        p[-1].append("In the end, {thing} was the one thing {hero} needed most."),
    ),
    "inner monologue": lambda p, th, rng: (
        _middle(p).append('{hero} thought to {him}self, "What should I do now?"'),
        _at_start(p, p[-1], '"I can do this," {hero} thought quietly.'),
    ),
    "symbolism": lambda p, th, rng: (
        p[0].append("{thing} shone like a small sun, a sign of hope."),
        p[-1].append("And {thing} kept shining, just like {his} hope."),
    ),
    "a MacGuffin": lambda p, th, rng: (
        p[0].append("Everyone in {place} wanted {thing}, but nobody knew why."),
        p[-1].append("Nobody ever found out what {thing} was really for."),
    ),
    "a non-linear timeline": lambda p, th, rng: _reorder(p, rng, reverse=False),
    "a reverse timeline": lambda p, th, rng: _reorder(p, rng, reverse=True),
    "circular narrative structure": lambda p, th, rng: p[-1].append("And so it began again. " + p[0][0]),
    "a flashback": lambda p, th, rng: _at_start(
        p, _middle(p), "{hero} remembered a day long ago, when {he} first saw {thing}."
    ),
    "a nested structure": lambda p, th, rng: _middle(p).extend(
        [
            "{friend} told a story about {a_creature}, who told a story about {a_thing}.",
            "Inside that story was one more story, small as a seed.",
        ]
    ),
    "a story within a story": lambda p, th, rng: _middle(p).extend(
        [
            "That night, {friend} told {hero} an old tale about {a_creature} who lost {a_thing} and found it again.",
            "{hero} listened and thought about {his} own story.",
        ]
    ),
    "a Red Herring": lambda p, th, rng: (
        p[0].append("{hero} was sure that {creature} was up to something."),
        _at_start(p, p[-1], "But {creature} had nothing to do with it after all."),
    ),
    "multiple perspectives": lambda p, th, rng: _middle(p).extend(
        [
            "From {friend}'s side, things looked very different.",
            "{friend} saw a small problem where {hero} saw a big one.",
        ]
    ),
    "Checkhov's gun": lambda p, th, rng: (
        p[0].append("On the wall of {place} hung an old rope that nobody ever used."),
        _at_start(p, p[-1], "{hero} grabbed the old rope from the wall, and it saved the day."),
    ),
    "the fourth wall": lambda p, th, rng: (
        p[0].insert(1, "Yes, you, reading this story, come a little closer."),
        _middle(p).append("You may be wondering, dear reader, what happened next."),
    ),
    "a cliffhanger": _cliffhanger,
    "an anti-hero": lambda p, th, rng: (
        p[0].insert(1, "{hero} was not a nice hero. {He} was grumpy and rude to everyone."),
        p[-1].append("Still, in {his} own grumpy way, {hero} did the right thing."),
    ),
    "juxtaposition": lambda p, th, rng: _middle(p).append(
        "Outside, {place} was loud and bright, but inside, {hero} felt quiet and dark."
    ),
    "climactic structure": lambda p, th, rng: _at_start(
        p, p[-1], "First the wind blew. Then the rain fell. Then the whole sky shook."
    ),
}


# Features whose device is the story's final sentence: no style line may follow it.
LAST_SENTENCE_FEATURES = {
    "a cliffhanger",
    "circular narrative structure",
    "a twist ending",
    "a story told through letters",
}


def plan(labels: dict, rng: random.Random) -> list[list[str]]:
    """The story as paragraphs of sentence templates: plot, topic, feature, grammar, persona and style lines.
    Events and style lines are drawn without replacement, so no sentence repeats by chance."""
    c = content()
    th, tp, lines, style = (
        c["themes"][labels["theme"]],
        c["topics"][labels["topic"]],
        c["styles"][labels["style"]],
        STYLES[labels["style"]],
    )
    n = labels["num_paragraphs"]
    events, flavor = rng.sample(tp["events"], len(tp["events"])), rng.sample(lines["flavor"], len(lines["flavor"]))
    questions = rng.sample(QUESTIONS, len(QUESTIONS))
    opening = [_opener(labels, rng), rng.choice(tp["setting"]), CAST[th["cast"]]]
    ending = th["end"] + (th["moral"] if rng.random() < 0.5 else [])
    if n == 1:
        paras = [opening[:2] + th["want"][:1] + th["turn"][:1] + ending]
    elif n == 2:
        paras = [opening + th["want"], th["obstacle"][:1] + th["turn"] + ending]
    else:
        paras = [opening, th["want"], th["obstacle"] + [events.pop()], th["turn"], ending]
        if n < 5:
            paras = (
                [paras[0] + paras[1], *paras[2:]] if n == 4 else [paras[0] + paras[1], paras[2] + paras[3], paras[4]]
            )
        for _ in range(n - 5):  # middle paragraphs: the world of the topic
            paras.insert(-2, [pool.pop() for pool in (events, flavor) if pool])
    paras = [list(p) for p in paras]
    if labels["grammar"]:
        _middle(paras).append(rng.choice(c["grammars"][labels["grammar"]]))
    if labels["persona"]:
        persona = c["personas"][labels["persona"]]
        paras[0].insert(1, persona["intro"])
        if n > 2:
            _middle(paras).append(persona["aside"])
        paras[-1].append(persona["outro"])
    if rng.random() < CHANT_SHARE:  # before the feature, which may need the story's last sentence
        intro, *uses = rng.sample(CHANT_INTRO, 1) + rng.sample(CHANT_USE, 2)
        paras[0].append(intro)
        if n > 2:
            _middle(paras).append(uses.pop())
        _at_start(paras, paras[-1], uses[0])
    if n > 1 and rng.random() < GAME_SHARE:
        _middle(paras).extend(packing_game(rng))
    FEATURES[labels["feature"]](paras, th, rng)
    last_stays_last = labels["feature"] in LAST_SENTENCE_FEATURES
    for i, para in enumerate(paras):  # the style's own lines
        keep_last = last_stays_last and i == n - 1
        if flavor and len(para) > keep_last and rng.random() < 0.5:
            para.insert(rng.randint(1, len(para) - keep_last), flavor.pop())
        if questions and not keep_last and rng.random() < style.question:
            para.append(questions.pop())
        if style.refrain and i < n - 1:
            para.append(lines["refrain"])
    if not last_stays_last and rng.random() < 0.7:
        paras[-1].append(rng.choice(lines["closer"]))
    return paras


def cast(labels: dict, rng: random.Random) -> dict[str, str]:
    """The story's slots: one hero and one friend (different names), place, object and creature."""
    tp = content()["topics"][labels["topic"]]
    (hero, pronoun), (friend, _) = _name(rng), _name(rng)
    while friend == hero:
        friend, _ = _name(rng)
    he, him, his = PRONOUNS[pronoun]
    thing, creature = rng.choice(tp["things"]), rng.choice(tp["creatures"])
    return {
        "hero": hero,
        "he": he,
        "him": him,
        "his": his,
        "He": he.capitalize(),
        "His": his.capitalize(),
        "friend": friend,
        "place": rng.choice(tp["places"]),
        "thing": "the " + thing,
        "a_thing": article(thing),
        "creature": "the " + creature,
        "a_creature": article(creature),
        "chant": chant(rng),
    }


def realise(paras: list[list[str]], labels: dict, slots: dict[str, str], rng: random.Random) -> str:
    """Fill the slots (`cast`) and shape sentences as the style does. The draws made here never depend on the slots'
    values, so a story realised again with one slot changed differs from it in that slot only (`sslens.pairs`)."""
    style = STYLES[labels["style"]]
    out = []
    for para in paras:
        sentences = []
        for template in para:
            s = template.format(**slots)
            if style.exclaim and s[-1] == "." and '"' not in s and rng.random() < style.exclaim:
                s = s[:-1] + "!"
            if (
                sentences
                and style.join
                and sentences[-1][-1] == "."
                and s.split(" ", 1)[0] in JOINABLE
                and '"' not in s
                and rng.random() < style.join
            ):
                sentences[-1] = f"{sentences[-1][:-1]}, and {s[0].lower()}{s[1:]}"
            else:
                sentences.append(s)
        out.append(" ".join(sentences))
    return "\n\n".join(out)


_PUNCTUATION_TO_SPACE = str.maketrans({c: " " for c in string.punctuation if c != "'"})
_NOT_PUNCTUATION = str.maketrans(
    {c: None for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789' \n"}
)
_VOWELS = re.compile(r"[aeiouy]+")


def syllables(word: str) -> int:
    """Vowel groups, less a silent final -e, -ed or -es: the usual readability heuristic."""
    word = word.lower()
    silent = (
        (word.endswith("e") and not word.endswith(("le", "ee")))
        or (word.endswith("ed") and not word.endswith(("ted", "ded")))
        or (word.endswith("es") and not word.endswith(("ses", "xes", "zes", "ces", "ges", "shes", "ches")))
    )
    return max(1, len(_VOWELS.findall(word)) - (silent and len(word) > 3))


class _PerWord(dict):
    """word -> f(word), computed once per word: `sum(map(table.__getitem__, words))` then runs at C speed."""

    def __init__(self, f: Callable[[str], int]):
        super().__init__()
        self.f = f

    def __missing__(self, word: str) -> int:
        self[word] = value = self.f(word)
        return value


_SYLLABLES = _PerWord(syllables)
_DIFFICULT = _PerWord(lambda w: int(syllables(w) >= 3))


def metrics(text: str) -> dict:
    """Length and readability columns, computed from the text. word_count counts punctuation marks as tokens, as
    the SimpleStories pipeline did; Flesch and Flesch-Kincaid use the standard formulas with a vowel-group syllable
    count; Dale-Chall takes words of three or more syllables as its 'difficult' words."""
    words = text.translate(_PUNCTUATION_TO_SPACE).split()
    n_words = max(1, len(words))
    n_sentences = max(1, text.count(".") - 2 * text.count("...") + text.count("!") + text.count("?"))
    n_syllables, n_difficult = sum(map(_SYLLABLES.__getitem__, words)), sum(map(_DIFFICULT.__getitem__, words))
    per_sentence, per_word, difficult = n_words / n_sentences, n_syllables / n_words, 100 * n_difficult / n_words
    return {
        "word_count": len(words) + len(text.translate(_NOT_PUNCTUATION)),
        "character_count": len(text),
        "num_paragraphs": text.count("\n\n") + 1,
        "avg_word_length": round(sum(map(len, words)) / n_words, 2),
        "avg_sentence_length": round(per_sentence, 2),
        "flesch_reading_ease": round(206.835 - 1.015 * per_sentence - 84.6 * per_word, 2),
        "flesch_kincaid_grade": round(0.39 * per_sentence + 11.8 * per_word - 15.59, 2),
        "dale_chall_readability_score": round(
            0.1579 * difficult + 0.0496 * per_sentence + (3.6365 if difficult > 5 else 0), 2
        ),
    }


def story_cast(generation_id: str) -> dict[str, str]:
    """The slots of the story with this `generation_id` ("synth-SEED-INDEX"), drawn again as `story` drew them."""
    try:
        _, seed, index = generation_id.split("-")
        rng = random.Random(f"{int(seed)}/{int(index)}")
    except ValueError:
        raise SSLensError(f"{generation_id!r} is not a story of the embedded corpus (synth-SEED-INDEX)") from None
    labels = sample_labels(rng)
    plan(labels, rng)
    return cast(labels, rng)


def story(seed: int, index: int) -> dict:
    """Row `index` of the corpus for `seed`: one story with all 21 SimpleStories columns."""
    rng = random.Random(f"{seed}/{index}")
    labels = sample_labels(rng)
    paras = plan(labels, rng)
    text = realise(paras, labels, cast(labels, rng), rng)
    row = {"story": text, **{k: labels[k] for k in LABEL_COLUMNS}, **metrics(text)}
    row |= {
        "num_stories_in_completion": 1,
        "expected_num_stories_in_completion": 1,
        "generation_id": f"synth-{seed}-{index}",
        "model": MODEL,
    }
    return row


COLUMNS = [
    "story",
    "topic",
    "theme",
    "style",
    "feature",
    "grammar",
    "persona",
    "initial_word_type",
    "initial_letter",
    "word_count",
    "character_count",
    "num_paragraphs",
    "avg_word_length",
    "avg_sentence_length",
    "flesch_reading_ease",
    "flesch_kincaid_grade",
    "dale_chall_readability_score",
    "num_stories_in_completion",
    "expected_num_stories_in_completion",
    "generation_id",
    "model",
]


def generate(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    return [story(seed, i) for i in range(start, start + n)]


def write_parquet(path: str | Path, n: int, seed: int = 0, start: int = 0) -> Path:
    """Stories start .. start + n - 1 as a parquet file in the SimpleStories schema, written atomically."""
    if not Path(path).parent.is_dir():
        raise SSLensError(f"output directory {Path(path).parent} does not exist")
    return write_rows(path, generate(n, seed, start))


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write through a temporary file of this process's own (the pid in its name, so a cache can tell a dead
    writer's leftover), so processes building the same corpus at once each rename a complete file into place."""
    path = Path(path)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in COLUMNS}, schema=schema()), buffer)
    data = buffer.getvalue()
    tmp = temporary_path(path)
    with writing(path, data.size):
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            atomic_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # before a full disk is reported, so the free room it names is real
    return path


@functools.cache
def version() -> str:
    """A hash of the generator's code and content: cached corpora are rebuilt when it changes."""
    files = resources.files(__name__)
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(f.name for f in files.iterdir() if f.name.endswith((".py", ".yaml", ".json"))):
        h.update(files.joinpath(name).read_bytes())
    return h.hexdigest()


def schema() -> pa.Schema:
    ints = {
        "word_count",
        "character_count",
        "num_paragraphs",
        "num_stories_in_completion",
        "expected_num_stories_in_completion",
    }
    floats = {
        "avg_word_length",
        "avg_sentence_length",
        "flesch_reading_ease",
        "flesch_kincaid_grade",
        "dale_chall_readability_score",
    }
    return pa.schema([(c, pa.int64() if c in ints else pa.float64() if c in floats else pa.string()) for c in COLUMNS])
