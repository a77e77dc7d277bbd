"""SAE latents named by story metadata: which label value (theme, topic, style, ...) each latent separates best,
and for each label value the latent that separates it best, beside the linear probe's accuracy for that label.

A latent's score for a story is its largest activation over the story's tokens (its mean is kept too). How well it
separates a label value from the rest is the one-vs-rest AUROC of that score: the chance that a story with the
value scores above one without it (ties count half). All latents and values are scored at once from ranks:
AUROC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), the Mann-Whitney U statistic.

Per token, the embedded corpus's generator knows which words fill a slot (the hero's and the friend's name, the
hero's pronoun, the object, the creature, the place): a latent's slot is the one that takes the largest share of its
activation (summed over tokens), reported with that share and its lift (share / the slot's share of all tokens).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save as save_tensors
from scipy.stats import rankdata
from torch import Tensor

from .actstore import StoredActivations, activation_store
from .checkpoint import load_model, requested_steps
from .config import CARD_PROBE_STORIES
from .data import Batches, tokenize
from .errors import SSLensError
from .feature_steps import write_feature_steps
from .fileio import atomic_write_bytes, atomic_write_text
from .generate import left_pad
from .model import HookedLlama
from .probe import feature_widths, fit, majority_accuracy, mean_pool, split, story_tokens
from .runcard import eval_stories, is_synth, model_step, run_stories
from .sae import (
    WEIGHTS_FILE,
    SAEConfig,
    SparseAutoencoder,
    activations,
    check_hook,
    evaluate_sae,
    save_sae,
)
from .sae_train import train_sae
from .synth import story_cast

LABELS = ("theme", "topic", "style", "feature", "grammar", "persona")
SLOTS = ("hero", "friend", "pronoun", "object", "creature", "place")  # slot i + 1 in `token_slots`; 0: no slot
WINDOWS_PER_FORWARD = 16
MIN_STORIES_PER_VALUE = 5  # fewer positives make an AUROC of 1 a matter of luck
HISTOGRAMS_FILE, HISTOGRAM_BINS = "histograms.safetensors", 24
SLOT_LIFT = 2.0  # a slot is part of a latent's name once it takes twice its share of all tokens


@dataclass
class StoryActivations:
    """Per story and latent: the largest and the mean activation over the story's tokens, and where the largest is
    (the token's index in the story); `tokens` are the stories' token ids; `inputs`, the hook's own activation
    mean-pooled per story (what `sslens probe` fits on, `probe.harvest`'s pooling). With token slots: each latent's
    activation summed over the tokens of each slot (row 0: tokens in no slot), and how many tokens each slot has."""

    max: Float[np.ndarray, "story latent"]
    mean: Float[np.ndarray, "story latent"]
    argmax: Int[np.ndarray, "story latent"]
    tokens: list[list[int]]
    inputs: Float[np.ndarray, "story d_in"] | None = None
    slot_mass: Float[np.ndarray, "slot latent"] | None = None
    slot_tokens: Int[np.ndarray, " slot"] | None = None


def slot_words(cast: dict[str, str]) -> dict[str, list[str]]:
    """The words of a story that fill each slot, from its cast (`synth.story_cast`)."""
    pronouns = [cast[k] for k in ("he", "him", "his", "He", "His")]
    return {
        "hero": [cast["hero"]],
        "friend": [cast["friend"]],
        "pronoun": pronouns,
        "object": [cast["thing"].removeprefix("the ")],
        "creature": [cast["creature"].removeprefix("the ")],
        "place": [cast["place"].removeprefix("the ")],
    }


def token_slots(tokenizer, text: str, cast: dict[str, str], n_ctx: int) -> Int[np.ndarray, " pos"]:
    """Per token of `text` (its first n_ctx): 1 + the index in SLOTS of the slot whose words it overlaps, or 0."""
    offsets = np.asarray(tokenizer.encode(text, add_special_tokens=False).offsets[:n_ctx]).reshape(-1, 2)
    out = np.zeros(len(offsets), np.int64)
    for slot, words in enumerate(slot_words(cast).values(), 1):
        for word in set(words):
            for m in re.finditer(rf"\b{re.escape(word)}\b", text):
                out[(offsets[:, 0] < m.end()) & (offsets[:, 1] > m.start())] = slot
    return out


@torch.inference_mode()
def story_activations(
    model: HookedLlama,
    sae: SparseAutoencoder,
    stories: Sequence[str],
    batch_size: int = 16,
    slots: Sequence[np.ndarray] | None = None,
) -> StoryActivations:
    """Encode every token of each story (its first n_ctx) and pool each latent, and the hook's activation itself,
    over the story; with `slots` (each story's `token_slots`), also sum each latent over each slot's tokens."""
    tokens = story_tokens(model, stories)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    top = np.zeros((len(tokens), sae.cfg.d_sae), np.float32)
    mean, where = np.zeros_like(top), np.zeros(top.shape, np.int32)
    inputs = np.zeros((len(tokens), sae.cfg.d_in), np.float32)
    mass = torch.zeros(len(SLOTS) + 1, sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([tokens[i] for i in rows], pad=0)
        x = activations(model, sae.cfg.hook_name, ids, mask)
        f = sae.encode(x)  # [batch, pos, d_sae]
        real = mask.to(f.device)[..., None].bool()
        inputs[rows] = mean_pool(x, mask).cpu().numpy()
        best, at = f.masked_fill(~real, -1.0).max(1)  # padding below any activation (they are >= 0)
        top[rows], mean[rows] = best.cpu().numpy(), mean_pool(f, mask).cpu().numpy()
        where[rows] = (at - (~real[:, :, 0]).sum(1, keepdim=True)).cpu().numpy()  # index in the story, not the row
        if slots is not None:
            slot = left_pad([slots[i] for i in rows], pad=len(SLOTS) + 1)[0]  # padding: a slot dropped below
            onehot = F.one_hot(slot, len(SLOTS) + 2)[..., :-1].to(f.device, torch.float64)
            mass += torch.einsum("bps,bpl->sl", onehot, f.double()).cpu()
    if slots is None:
        return StoryActivations(top, mean, where, tokens, inputs)
    counts = np.bincount(np.concatenate([np.asarray(s) for s in slots]), minlength=len(SLOTS) + 1)
    return StoryActivations(top, mean, where, tokens, inputs, mass.numpy(), counts)


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


def value_table(
    acts: StoryActivations, labels: dict[str, Sequence[str]], probes: dict[str, tuple[float, float]] | None = None
) -> pd.DataFrame:
    """One row per label value held by at least MIN_STORIES_PER_VALUE stories (and not by all): the latent that
    separates it best, its AUROC, and its precision among the top-activating stories (as many as hold the value);
    with `probes` (`probe_accuracies`), the label's linear-probe accuracy and majority-class accuracy beside it."""
    probes = probes or {}
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
                    "probe_accuracy": probes.get(label, (np.nan, np.nan))[0],
                    "probe_majority": probes.get(label, (np.nan, np.nan))[1],
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
    table = pd.DataFrame(
        {
            "latent": np.arange(n),
            "stories_active": (acts.max > 0).sum(0),
            "label": best_label,
            "value": best_value,
            "auroc": best,
        }
    )
    return table if acts.slot_mass is None else pd.concat([table, slot_table(acts)], axis=1)


def probe_accuracies(
    features: Float[np.ndarray, "story d_in"], labels: dict[str, Sequence[str]], seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Per label: the test accuracy of `sslens probe`'s linear probe on the hook's mean-pooled activations
    (`StoryActivations.inputs`), and the majority class's (same split as `sslens probe` with this seed); labels no
    probe can be fitted on are left out."""
    out = {}
    for label, values in labels.items():
        y = np.asarray([str(v) for v in values])
        if len(set(y)) < 2:
            continue
        train, val, test = split(list(y), seed)
        out[label] = (fit(features, y, train, val, test)[0], majority_accuracy(y, train, test))
    return out


def slot_table(acts: StoryActivations) -> pd.DataFrame:
    """Per latent: the slot taking the largest share of its summed activation, the share, and its lift over the
    slot's share of all tokens (1: no preference); empty for a latent that never fires."""
    total = acts.slot_mass.sum(0)
    share = acts.slot_mass[1:] / np.where(total > 0, total, 1.0)
    base = acts.slot_tokens[1:] / acts.slot_tokens.sum()
    best = share.argmax(0)
    fires = total > 0
    picked = share[best, np.arange(share.shape[1])]
    return pd.DataFrame(
        {
            "slot": np.where(fires, np.asarray(SLOTS)[best], ""),
            "slot_share": np.where(fires, picked, 0.0),
            "slot_lift": np.where(fires, picked / np.maximum(base[best], 1e-12), 0.0),
        }
    )


def sae_dir(path: str | Path, cfg: SAEConfig, step: int | None) -> Path:
    """Where a model's SAE lives: MODEL/saes/HOOK/ARCH-WIDTH[-kK][-to-HOOK_OUT]/step_NNNNNNN (or .../final without
    steps); a transcoder's name ends with its target hook."""
    name = f"{cfg.arch}-{cfg.d_sae}" + (f"-k{cfg.k}" if cfg.arch == "topk" else "")
    name += f"-to-{cfg.hook_name_out}" if cfg.transcoder else ""
    return Path(path) / "saes" / cfg.hook_name / name / ("final" if step is None else f"step_{step:07d}")


def find_saes(path: str | Path) -> dict[str, dict[int | None, Path]]:
    """A model's saved SAEs (`sae_dir`): "HOOK/ARCH-WIDTH[-kK]" -> {checkpoint step (None for "final"): directory}."""
    found: dict[str, dict[int | None, Path]] = {}
    for weights in sorted((Path(path) / "saes").glob(f"*/*/*/{WEIGHTS_FILE}")):
        where = weights.parent
        if where.name == "final" or re.fullmatch(r"step_\d+", where.name):
            step = None if where.name == "final" else int(where.name.removeprefix("step_"))
            found.setdefault(f"{where.parent.parent.name}/{where.parent.name}", {})[step] = where
    return found


def read_naming(directory: str | Path) -> dict:
    """What `name_latents` wrote beside an SAE: "latents" (latents.csv, empty cells as ""), "contexts"
    (contexts.json) and "histograms" (`peak_histograms`, as numpy arrays), each None where absent: an SAE trained on
    stories without labels has none."""
    d = Path(directory)
    latents, contexts, histograms = d / "latents.csv", d / "contexts.json", d / HISTOGRAMS_FILE
    return {
        "latents": pd.read_csv(latents, keep_default_na=False) if latents.is_file() else None,
        "contexts": json.loads(contexts.read_text()) if contexts.is_file() else None,
        "histograms": load_numpy(histograms) if histograms.is_file() else None,
    }


def latent_name(row: dict, min_lift: float = SLOT_LIFT) -> str:
    """A latent as latents.csv names it: the label value it separates best, with that AUROC, and its story slot where
    the slot's share of the latent is `min_lift` times its share of all tokens; "" for a latent nothing names."""
    parts = []
    if row.get("label"):
        parts.append(f"{row['label']}={row['value']} (AUROC {float(row['auroc']):.2f})")
    if row.get("slot") and float(row.get("slot_lift") or 0) >= min_lift:
        parts.append(f"slot {row['slot']} (x{float(row['slot_lift']):.1f})")
    return ", ".join(parts)


def train_saes(
    path: str | Path,
    hook: str,
    steps: Sequence[int] | str | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    name_stories: int = CARD_PROBE_STORIES,
    probes: bool = True,
    store: str | None = None,
    **settings,
) -> list[Path]:
    """An SAE on `hook` for each requested checkpoint of a run (see `requested_steps`), each warm-started from the
    previous one, evaluated on held-out stories, saved (`sae_dir` under `out`, default the model's directory), and
    its latents named by the labels of `name_stories` stories (the run card's probe stories), beside each label's
    linear probe unless `probes` is False (a few seconds per label). With several named checkpoints, the features
    are followed across them (`write_feature_steps`, into the SAEs' parent directory). With `store` ("fp32" or
    "bf16") the activations are read from an on-disk store (`actstore.activation_store`), built once per checkpoint,
    hook and token count and reused by later calls with other widths or k. `settings` are SAEConfig fields."""
    steps = requested_steps(path, steps, "train SAEs on")
    train, val = run_stories(path, data)
    named = eval_stories(path, data, name_stories)[1]
    written: dict[int | None, Path] = {}  # checkpoint step -> the SAE's directory
    previous = None
    for step in steps:
        model = load_model(path, step).eval()
        if model.tokenizer is None:
            raise SSLensError(f"{path} has no tokenizer, so no stories can be encoded for its activations")
        cfg = sae_config(model, hook, str(path), model_step(path, step), **settings)
        windows = Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, WINDOWS_PER_FORWARD, seed=cfg.seed)
        if store is not None:
            windows = StoredActivations(activation_store(model, cfg.hooks, windows, cfg.tokens, store), cfg)
        at = f" at step {cfg.step}" if cfg.step is not None else ""
        target = sae_dir(out or path, cfg, cfg.step)
        resume = target.with_name(f".resume-{target.name}")  # a killed training resumes from here
        sae, log = train_sae(
            model, windows, cfg, previous, progress=f"SAE on {hook}{at}" if progress else None, resume=resume
        )
        held_out = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, WINDOWS_PER_FORWARD)
        save_sae(sae, target, evaluate_sae(model, sae, held_out), log)
        shutil.rmtree(resume, ignore_errors=True)
        name_latents(model, sae, named, target, probes)
        written[cfg.step], previous = target, sae
    if len(written) > 1 and all((w / "values.csv").is_file() for w in written.values()):
        write_feature_steps(written, target.parent)
    return list(written.values())


def sae_config(model: HookedLlama, hook: str, model_name: str, step: int | None, **settings) -> SAEConfig:
    """An SAE's settings for this model: its hooks checked, their widths read off the model."""
    out = settings.get("hook_name_out") or ""
    for name in [hook] + ([out] if out else []):
        check_hook(model, name)
    d_out = feature_widths(model, [out])[0] if out else 0
    return SAEConfig(hook, feature_widths(model, [hook])[0], **settings, d_out=d_out, model_name=model_name, step=step)


def name_latents(
    model: HookedLlama, sae: SparseAutoencoder, stories: datasets.Dataset, target: Path, probes: bool = True
) -> None:
    """Write `latents.csv`, `values.csv` (see `latent_table`, `value_table`; with `probes`, each label's probe
    accuracy), `contexts.json` (each latent that fires: its top stories, `top_contexts`) and the peak histograms into
    an SAE's directory; without labels to name them by, say so in one line and write nothing (the SAE itself is saved
    already)."""
    labels = {label: stories[label] for label in LABELS if label in stories.column_names}
    if not any(True for _ in label_values(labels)):
        print(
            f"sslens: note: no label ({', '.join(LABELS)}) has a value held by {MIN_STORIES_PER_VALUE} of the "
            f"{len(stories)} stories, so latents are not named"
        )
        return
    slots = None
    if is_synth(stories):
        casts = map(story_cast, stories["generation_id"])
        slots = [token_slots(model.tokenizer, t, c, model.cfg.n_ctx) for t, c in zip(stories["story"], casts)]
    acts = story_activations(model, sae, stories["story"], slots=slots)
    accuracies = probe_accuracies(acts.inputs, labels) if probes else None
    atomic_write_text(target / "latents.csv", latent_table(acts, labels).to_csv(index=False))
    atomic_write_text(target / "values.csv", value_table(acts, labels, accuracies).to_csv(index=False))
    contexts = {latent: top_contexts(acts, model.tokenizer, latent) for latent in range(sae.cfg.d_sae)}
    atomic_write_text(target / "contexts.json", json.dumps({k: v for k, v in contexts.items() if v}) + "\n")
    atomic_write_bytes(target / HISTOGRAMS_FILE, save_tensors(peak_histograms(acts)))


def peak_histograms(acts: StoryActivations, bins: int = HISTOGRAM_BINS) -> dict[str, Tensor]:
    """Per latent, how its peak activation is spread over the stories it fires on: `counts` [latent, bins] over
    `bins` equal bins from 0 to `top` [latent] (its largest peak), and `silent` [latent], the stories it skips."""
    peaks = torch.from_numpy(acts.max).T  # [latent, story]
    top = peaks.max(1).values
    scaled = (peaks / top.clamp(min=1e-12)[:, None] * bins).long().clamp(max=bins - 1)
    fired = peaks > 0
    counts = torch.zeros(len(top), bins, dtype=torch.int64).scatter_add_(1, scaled, fired.long())
    return {"counts": counts.int(), "top": top.float(), "silent": (~fired).sum(1).int()}
