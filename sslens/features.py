"""SAE latents named by story metadata: which label value (theme, topic, style, ...) each latent separates best,
and for each label value the latent that separates it best, beside the linear probe's accuracy for that label.

A latent's score for a story is its largest activation over the story's tokens (its mean is kept too). How well it
separates a label value from the rest is the one-vs-rest AUROC of that score: the chance that a story with the
value scores above one without it (ties count half). All latents and values are scored at once from ranks:
AUROC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), the Mann-Whitney U statistic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy.stats import rankdata

from .checkpoint import load_model, read_split, requested_steps
from .config import CARD_PROBE_STORIES
from .data import Batches, load_stories, tokenize, training_stories, validation_stories
from .errors import SSLensError
from .fileio import atomic_write_text
from .generate import left_pad
from .model import HookedLlama
from .probe import feature_widths, story_tokens, training_data
from .runcard import eval_stories, model_step
from .sae import SAEConfig, SparseAutoencoder, activations, check_hook, evaluate_sae, save_sae, train_sae

LABELS = ("theme", "topic", "style", "feature", "grammar", "persona")
WINDOWS_PER_FORWARD = 16
MIN_STORIES_PER_VALUE = 5  # fewer positives make an AUROC of 1 a matter of luck


@dataclass
class StoryActivations:
    """Per story and latent: the largest and the mean activation over the story's tokens, and where the largest is
    (the token's index in the story); `tokens` are the stories' token ids."""

    max: Float[np.ndarray, "story latent"]
    mean: Float[np.ndarray, "story latent"]
    argmax: Int[np.ndarray, "story latent"]
    tokens: list[list[int]]


@torch.inference_mode()
def story_activations(
    model: HookedLlama, sae: SparseAutoencoder, stories: Sequence[str], batch_size: int = 16
) -> StoryActivations:
    """Encode every token of each story (its first n_ctx) and pool each latent over the story."""
    tokens = story_tokens(model, stories)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    top = np.zeros((len(tokens), sae.cfg.d_sae), np.float32)
    mean, where = np.zeros_like(top), np.zeros(top.shape, np.int32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([tokens[i] for i in rows], pad=0)
        f = sae.encode(activations(model, sae.cfg.hook_name, ids, mask))  # [batch, pos, d_sae]
        real = mask.to(f.device)[..., None].bool()
        best, at = f.masked_fill(~real, -1.0).max(1)  # padding below any activation (they are >= 0)
        top[rows], mean[rows] = best.cpu().numpy(), ((f * real).sum(1) / real.sum(1)).cpu().numpy()
        where[rows] = (at - (~real[:, :, 0]).sum(1, keepdim=True)).cpu().numpy()  # index in the story, not the row
    return StoryActivations(top, mean, where, tokens)


def top_contexts(
    acts: StoryActivations, tokenizer, latent: int, n: int = 5, before: int = 12, after: int = 3
) -> list[dict]:
    """The `n` stories where `latent` is largest (if it fires there at all): the story, the token and its position,
    the activation, and the text around it with the token in [[ ]]."""
    out = []
    for story in np.argsort(-acts.max[:, latent], kind="stable")[:n]:
        value = float(acts.max[story, latent])
        if value <= 0:
            break
        ids, at = acts.tokens[story], int(acts.argmax[story, latent])
        text = " ".join(
            [tokenizer.decode(ids[max(0, at - before) : at]), f"[[{tokenizer.id_to_token(ids[at])}]]"]
            + [tokenizer.decode(ids[at + 1 : at + 1 + after])]
        )
        out.append({"story": int(story), "position": at, "activation": value, "context": text.strip()})
    return out


def auroc(scores: Float[np.ndarray, "story latent"], positive: np.ndarray) -> Float[np.ndarray, "value latent"]:
    """One-vs-rest AUROC of every latent for every value: `positive` is [value, story] booleans."""
    ranks = rankdata(scores, axis=0)  # ties get their average rank
    n_pos = positive.sum(1, keepdims=True).astype(np.float64)
    n_neg = positive.shape[1] - n_pos
    rank_sums = positive.astype(np.float64) @ ranks
    return (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def label_values(labels: dict[str, Sequence[str]]) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """Per label: the values held by at least MIN_STORIES_PER_VALUE stories (and not by all), and which stories
    hold each ([value, story] booleans). Empty values (a story without a persona) are no value."""
    for label, values in labels.items():
        values = np.asarray([str(v) for v in values])
        kept = [v for v in np.unique(values) if v and MIN_STORIES_PER_VALUE <= (values == v).sum() < len(values)]
        if kept:
            yield label, kept, np.stack([values == v for v in kept])


def value_table(acts: StoryActivations, labels: dict[str, Sequence[str]]) -> pd.DataFrame:
    """One row per label value held by at least MIN_STORIES_PER_VALUE stories (and not by all): the latent that
    separates it best, its AUROC, and its precision among the top-activating stories (as many as hold the value)."""
    rows = []
    for label, kept, positive in label_values(labels):
        scores = auroc(acts.max, positive)
        for i, value in enumerate(kept):
            best = int(scores[i].argmax())
            n = int(positive[i].sum())
            top = np.argsort(-acts.max[:, best], kind="stable")[:n]
            rows.append(
                {
                    "label": label,
                    "value": value,
                    "stories": n,
                    "latent": best,
                    "auroc": float(scores[i, best]),
                    "precision": float(positive[i, top].mean()),
                }
            )
    if not rows:
        raise SSLensError(f"no label value is held by at least {MIN_STORIES_PER_VALUE} of the stories")
    return pd.DataFrame(rows).sort_values(["label", "auroc"], ascending=[True, False], ignore_index=True)


def latent_table(acts: StoryActivations, labels: dict[str, Sequence[str]]) -> pd.DataFrame:
    """One row per latent: how many stories it fires on, and the label value it separates best (with its AUROC)."""
    n = acts.max.shape[1]
    best_value, best_label, best = [""] * n, [""] * n, np.full(n, 0.5)
    for label, kept, positive in label_values(labels):
        scores = auroc(acts.max, positive)
        for latent in np.flatnonzero(scores.max(0) > best):
            i = int(scores[:, latent].argmax())
            best[latent], best_value[latent], best_label[latent] = scores[i, latent], kept[i], label
    return pd.DataFrame(
        {
            "latent": np.arange(n),
            "stories_active": (acts.max > 0).sum(0),
            "label": best_label,
            "value": best_value,
            "auroc": best,
        }
    )


def sae_dir(path: str | Path, cfg: SAEConfig, step: int | None) -> Path:
    """Where a model's SAE lives: MODEL/saes/HOOK/ARCH-WIDTH[-kK]/step_NNNNNNN (or .../final without steps)."""
    name = f"{cfg.arch}-{cfg.d_sae}" + (f"-k{cfg.k}" if cfg.arch == "topk" else "")
    return Path(path) / "saes" / cfg.hook_name / name / ("final" if step is None else f"step_{step:07d}")


def sae_stories(path: str | Path, data: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training stories, held-out stories): a run's own split; for another model, `data`'s (default: synth)."""
    record = read_split(path) if (Path(path) / "config.yaml").is_file() else None
    if record is not None and data is None:
        return training_stories(record), validation_stories(record)
    source = data or training_data(path) or "synth"
    return load_stories(source, "train"), load_stories(source, "test")


def train_saes(
    path: str | Path,
    hook: str,
    steps: Sequence[int] | str | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    name_stories: int = CARD_PROBE_STORIES,
    **settings,
) -> list[Path]:
    """An SAE on `hook` for each requested checkpoint of a run (see `requested_steps`), each warm-started from the
    previous one, evaluated on held-out stories, saved (`sae_dir` under `out`, default the model's directory), and
    its latents named by the labels of `name_stories` stories (the run card's probe stories). `settings` are SAEConfig
    fields."""
    steps = requested_steps(path, steps, "train SAEs on")
    train, val = sae_stories(path, data)
    named = eval_stories(path, data, name_stories)[1]
    written, previous = [], None
    for step in steps:
        model = load_model(path, step).eval()
        if model.tokenizer is None:
            raise SSLensError(f"{path} has no tokenizer, so no stories can be encoded for its activations")
        check_hook(model, hook)
        cfg = SAEConfig(hook, feature_widths(model, [hook])[0], **settings)
        cfg.model_name, cfg.step = str(path), model_step(path, step)
        windows = Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, WINDOWS_PER_FORWARD, seed=cfg.seed)
        at = f" at step {cfg.step}" if cfg.step is not None else ""
        sae, log = train_sae(model, windows, cfg, previous, progress=f"SAE on {hook}{at}" if progress else None)
        held_out = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, WINDOWS_PER_FORWARD)
        target = sae_dir(out or path, cfg, cfg.step)
        save_sae(sae, target, evaluate_sae(model, sae, held_out), log)
        name_latents(model, sae, named, target)
        written.append(target)
        previous = sae
    return written


def name_latents(model: HookedLlama, sae: SparseAutoencoder, stories: datasets.Dataset, target: Path) -> None:
    """Write `latents.csv`, `values.csv` (see `latent_table`, `value_table`) and `contexts.json` (each latent that
    fires: its top stories, `top_contexts`) into an SAE's directory; without labels to name them by, say so in one
    line and write nothing (the SAE itself is saved already)."""
    labels = {label: stories[label] for label in LABELS if label in stories.column_names}
    if not any(True for _ in label_values(labels)):
        print(
            f"sslens: note: no label ({', '.join(LABELS)}) has a value held by {MIN_STORIES_PER_VALUE} of the "
            f"{len(stories)} stories, so latents are not named"
        )
        return
    acts = story_activations(model, sae, stories["story"])
    atomic_write_text(target / "latents.csv", latent_table(acts, labels).to_csv(index=False))
    atomic_write_text(target / "values.csv", value_table(acts, labels).to_csv(index=False))
    contexts = {latent: top_contexts(acts, model.tokenizer, latent) for latent in range(sae.cfg.d_sae)}
    atomic_write_text(target / "contexts.json", json.dumps({k: v for k, v in contexts.items() if v}) + "\n")
