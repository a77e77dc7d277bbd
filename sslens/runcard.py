"""The run card (`sslens eval`): what a researcher checks first about a trained model, on held-out stories.

Validation loss and tokens seen say how far training got; the induction score, name copying and the last-token
theme probe say whether the model has mechanisms worth taking apart; greedy continuations show what it writes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import synth
from .checkpoint import load_model, read_split, requested_steps, saved_steps, tokens_seen
from .config import CARD_PROBE_STORIES, DEFAULT_PROBE_HOOKS
from .data import Batches, load_stories, training_stories, validation_stories
from .errors import SSLensError
from .lens import repeated_tokens_induction_scores
from .model import HookedLlama
from .probe import check_labels, fit, harvest, majority_accuracy, resolve_hooks, split, story_tokens, training_data
from .tokenizer import encode_batch

if TYPE_CHECKING:
    import plotly.graph_objects as go

# Fixed prompts, so cards of different checkpoints and runs can be read side by side.
PROMPTS = (
    "Once upon a time",
    "One day, Bimo went to the old treasure room.",
    "Lora had a good friend named Tavi.",
    "The little robot wanted to",
    "In the quiet forest,",
)
CONTINUATION_TOKENS = 60
THEME = "theme"
CARD_METRICS = {
    "val_loss": "validation loss",
    "induction": "best induction score",
    "name_copying": "name copying",
    "theme_block": "theme probe, best block",
    "theme_embed": "theme probe, embedding",
}


@dataclass
class RunCard:
    """One checkpoint's card. A metric the data cannot give (name copying needs the embedded corpus, the theme probe
    a `theme` column) is None."""

    model: str
    step: int | None
    tokens_seen: int | None
    val_loss: float | None
    val_tokens: int | None
    induction: float
    induction_head: str  # "L3H1"
    name_copying: float | None
    name_mentions: int
    theme_block: float | None
    theme_block_hook: str | None
    theme_embed: float | None
    theme_chance: float | None
    continuations: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        """The card as Markdown: a table of the numbers, then the continuations."""
        rows = [
            ("step", self.step),
            ("tokens seen", _count(self.tokens_seen)),
            (
                "validation loss",
                _num(self.val_loss) + (f" ({self.val_tokens:,} held-out tokens)" if self.val_tokens else ""),
            ),
            ("best induction score (repeated random tokens)", f"{self.induction:.3f} ({self.induction_head})"),
            (
                "name copying (later mentions of hero and friend)",
                "n/a" if self.name_copying is None else f"{self.name_copying:.1%} of {self.name_mentions:,}",
            ),
            (
                "theme probe, last token, best block",
                "n/a" if self.theme_block is None else f"{self.theme_block:.3f} ({self.theme_block_hook})",
            ),
            (
                "theme probe, last token, embedding",
                _num(self.theme_embed)
                + (f" (majority class {self.theme_chance:.3f})" if self.theme_chance is not None else ""),
            ),
        ]
        lines = [
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            "",
            "Greedy continuations:",
            "",
        ]
        lines += [f"- **{p}** {c.strip()}" for p, c in self.continuations]
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _count(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def evaluate(
    path: str | Path, step: int | None = None, data: str | None = None, probe_stories: int = CARD_PROBE_STORIES
) -> RunCard:
    """The card of a run's checkpoint (newest, or `step`), a checkpoint or HF directory, or a hub name. Stories: the
    run's held-out validation stories; for another model, the test split of `data` (default: the embedded corpus)."""
    return evaluate_steps(path, [step] if step is not None else None, data, probe_stories)[0]


def evaluate_steps(
    path: str | Path,
    steps: Sequence[int] | str | None,
    data: str | None = None,
    probe_stories: int = CARD_PROBE_STORIES,
    progress: bool = False,
) -> list[RunCard]:
    """A card per checkpoint: `steps` is "all" (every saved step), a list of steps, or None (the newest, or the
    one model of a directory or hub name). The stories are read once for all of them."""
    steps = requested_steps(path, steps, "evaluate")
    stories = None
    cards = []
    for step in tqdm(steps, desc="checkpoints", disable=not progress, dynamic_ncols=True):
        model = load_model(path, step).eval()
        if model.tokenizer is None:
            raise SSLensError(f"{path} has no tokenizer, so no stories can be encoded for its card")
        stories = stories or eval_stories(path, data, probe_stories)
        cards.append(card(model, path, model_step(path, step), *stories))
    return cards


def card(
    model: HookedLlama, path: str | Path, card_step: int | None, val: datasets.Dataset, probe_set: datasets.Dataset
) -> RunCard:
    """The card of one loaded model: loss on `val`, names and theme on `probe_set`."""
    seen = tokens_seen(path) if card_step is not None else {}
    induction = repeated_tokens_induction_scores(model, seq_len=min(50, model.cfg.n_ctx // 2))
    layer, head = divmod(int(induction.argmax()), model.cfg.n_heads)
    loss, n_tokens = stories_loss(model, val["story"])
    copying, mentions, block, hook, embed, chance = story_measures(model, probe_set)
    samples = model.generate(list(PROMPTS), CONTINUATION_TOKENS, temperature=0)
    return RunCard(
        model.cfg.model_name,
        card_step,
        seen.get(card_step),
        loss,
        n_tokens,
        float(induction.max()),
        f"L{layer}H{head}",
        copying,
        mentions,
        block,
        hook,
        embed,
        chance,
        [(p, s.text) for p, s in zip(PROMPTS, samples)],
    )


def model_step(path: str | Path, step: int | None) -> int | None:
    steps = saved_steps(path)
    return step if step is not None else (steps[-1] if steps else None)


def run_stories(path: str | Path, data: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training stories, held-out stories): a run's own split; for another model, `data`'s (default: synth). What
    SAEs and tuned lenses train and are evaluated on."""
    record = read_split(path) if (Path(path) / "config.yaml").is_file() else None
    if record is not None and data is None:
        return training_stories(record), validation_stories(record)
    source = data or training_data(path) or "synth"
    return load_stories(source, "train"), load_stories(source, "test")


def eval_stories(path: str | Path, data: str | None, n_probe: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(stories for the loss, stories for name copying and the probe). A run's own validation stories; for the
    embedded corpus the probe also gets fresh stories from beyond the run's corpus, as none of them was trained on."""
    record = read_split(path) if (Path(path) / "config.yaml").is_file() else None
    if record is not None and data is None:
        val = validation_stories(record)
        source = record["data"]
    else:
        source = data or training_data(path) or "synth"
        val = load_stories(source, "test")
    if len(val) >= n_probe or not str(source).startswith("synth"):
        return val, val.select(range(min(n_probe, len(val))))
    n = int(str(source).partition(":")[2] or 100_000)
    fresh = datasets.Dataset.from_list(synth.generate(n_probe - len(val), seed=0, start=n + max(1, n // 100)))
    return val, datasets.concatenate_datasets([val.select_columns(fresh.column_names), fresh])


def is_synth(stories: datasets.Dataset) -> bool:
    return "model" in stories.column_names and all(m == synth.MODEL for m in stories["model"])


@torch.inference_mode()
def stories_loss(model: HookedLlama, stories: Sequence[str], batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss over the stories, each ending in [EOS], joined and cut into windows of n_ctx + 1 tokens
    as training and validation cut them (a window's first token is only a context); and the tokens predicted."""
    ids = np.fromiter((i for row in encode_batch(model.tokenizer, list(stories), eos=True) for i in row), np.int64)
    batches = Batches(ids, model.cfg.n_ctx, batch_size, what="the held-out stories")
    total, count = 0.0, 0
    for start in range(0, batches.n_windows, batch_size):
        rows = batches.windows(range(start, min(batches.n_windows, start + batch_size))).to(model.W_E.device)
        logits = model(rows[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
        count += rows[:, 1:].numel()
    return total / count, count


def name_first_tokens(model: HookedLlama) -> Int[Tensor, " n"]:
    """The distinct first tokens of every name the embedded corpus's generator can give a hero or friend."""
    ids = encode_batch(model.tokenizer, list(synth.all_names()), eos=False)
    return torch.tensor(sorted({row[0] for row in ids}))


def name_mentions(tokenizer, text: str, names: Sequence[str], n_ctx: int) -> list[int]:
    """Token positions (within the first n_ctx) where a later mention of one of `names` starts: every mention after
    the name's first one."""
    position: dict[int, int] = {}  # character offset -> the token starting there
    for i, (start, _) in enumerate(tokenizer.encode(text, add_special_tokens=False).offsets):
        position.setdefault(start, i)
    found = []
    for name in names:
        later = [m.start() for m in re.finditer(rf"\b{re.escape(name)}\b", text)][1:]
        found += [position[c] for c in later if c in position and 0 < position[c] < n_ctx]
    return sorted(found)


class NameCopying:
    """At every later mention of a story's hero or friend, whether the model ranks that name's first token above the
    first token of every other name the generator can use (given that a name comes, does it pick the right one?).
    Fed batches of left-padded logits by `probe.harvest` (`on_logits`), so it shares the probe's forward."""

    def __init__(self, model: HookedLlama, stories: datasets.Dataset, ids: Sequence[Sequence[int]]):
        self.candidates = name_first_tokens(model).to(model.W_E.device)
        casts = [synth.story_cast(g) for g in stories["generation_id"]]
        self.mentions = [
            name_mentions(model.tokenizer, text, (c["hero"], c["friend"]), model.cfg.n_ctx)
            for text, c in zip(stories["story"], casts)
        ]
        self.ids, self.right, self.total = ids, 0, 0

    def __call__(self, rows: list[int], logits: Float[Tensor, "batch pos d_vocab"]) -> None:
        for b, i in enumerate(rows):
            pad = logits.shape[1] - len(self.ids[i])
            for p in self.mentions[i]:
                self.right += picks_the_name(logits[b, pad + p - 1], self.ids[i][p], self.candidates)
                self.total += 1

    @property
    def fraction(self) -> float:
        return self.right / self.total if self.total else 0.0


@torch.inference_mode()
def name_copying(model: HookedLlama, stories: datasets.Dataset, batch_size: int = 32) -> tuple[float, int]:
    """The fraction of later name mentions the model gets right (see `NameCopying`), and their number."""
    ids = story_tokens(model, stories["story"])
    counter = NameCopying(model, stories, ids)
    harvest(model, ids, [], batch_size=batch_size, on_logits=counter)
    return counter.fraction, counter.total


def picks_the_name(logits: Float[Tensor, " d_vocab"], name: int, candidates: Int[Tensor, " n"]) -> bool:
    others = candidates[candidates != name]
    return bool(others.numel() == 0 or logits[name] > logits[others].max())


def story_measures(model: HookedLlama, stories: datasets.Dataset) -> tuple:
    """Name copying (embedded-corpus stories only) and the last-token theme probe, from one forward per batch:
    (name copying, mentions, best block's theme accuracy, its hook, the embedding's, the majority class's)."""
    ids = story_tokens(model, stories["story"])
    counter = NameCopying(model, stories, ids) if is_synth(stories) else None
    has_theme = THEME in stories.column_names
    hooks = resolve_hooks(model, DEFAULT_PROBE_HOOKS) if has_theme else []
    features = harvest(model, ids, hooks, pool="last", on_logits=counter)
    copying = (counter.fraction, counter.total) if counter else (None, 0)
    return copying + (theme_probe(features, stories[THEME]) if has_theme else (None, None, None, None))


def theme_probe(features: dict[str, np.ndarray], themes: Sequence[str]) -> tuple[float, str, float, float]:
    """(best block's accuracy, its hook, the embedding's accuracy, the majority-class accuracy) of a theme probe on
    last-token features of hook_embed and each block."""
    labels = np.asarray([str(t) for t in themes])
    check_labels(list(labels))
    train, val, test = split(list(labels), seed=0)
    accuracy = {hook: fit(x, labels, train, val, test)[0] for hook, x in features.items()}
    best = max((h for h in features if h != "hook_embed"), key=accuracy.__getitem__)
    return accuracy[best], best, accuracy["hook_embed"], majority_accuracy(labels, train, test)


def cards_table(cards: Sequence[RunCard]) -> str:
    """One row per card: step, tokens and the card's numbers, as aligned text."""
    head = (
        f"{'step':>6} {'tokens':>11} {'val_loss':>8} {'induction':>13} {'names':>6} {'theme blk':>9} {'theme emb':>9}"
    )
    rows = [head]
    for c in cards:
        rows.append(
            f"{c.step if c.step is not None else '-':>6} {_count(c.tokens_seen):>11} {_num(c.val_loss):>8} "
            f"{c.induction:>6.3f} {c.induction_head:>6} "
            f"{'n/a' if c.name_copying is None else f'{c.name_copying:.1%}':>6} "
            f"{_num(c.theme_block):>9} {_num(c.theme_embed):>9}"
        )
    return "\n".join(rows)


def cards_figure(cards: Sequence[RunCard], title: str = "run card against training step") -> go.Figure:
    """Each metric of the cards against training step, one panel per metric."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=len(CARD_METRICS) - 1,
        subplot_titles=list(CARD_METRICS.values())[:-2] + ["theme probe (last token)"],
    )
    steps = [c.step for c in cards]
    for col, key in enumerate(("val_loss", "induction", "name_copying"), 1):
        fig.add_scatter(
            x=steps, y=[getattr(c, key) for c in cards], mode="lines+markers", name=CARD_METRICS[key], row=1, col=col
        )
    for key in ("theme_block", "theme_embed"):
        fig.add_scatter(
            x=steps, y=[getattr(c, key) for c in cards], mode="lines+markers", name=CARD_METRICS[key], row=1, col=4
        )
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title, height=360)
    return fig
