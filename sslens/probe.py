"""Linear probes for story metadata (theme, topic, style, ...): where in the network, and when in training, a label
becomes linearly decodable.

Protocol, per hook: each story is one example, its activations pooled over its tokens (mean) or taken at its last
token. Stories are split 60/20/20 into train/validation/test (stratified by label where every label has five
stories). A multinomial logistic regression on standardised features (scikit-learn's objective, fitted with torch's
L-BFGS and warm-started along the C path: the same predictions as LogisticRegression, and faster: 2.2 s for five C
values against 3.3 s for its four on 1,200 stories x 64 features, 63 classes) is fitted for each regularisation
strength C in `C_GRID`; the one with the best validation accuracy is scored on the test stories.

Control task (after Hewitt & Liang, 2019): every story *type* -- its first word, lowercased -- gets a label drawn at
random from the training label distribution, and the same probe is fitted to those labels. A probe can only solve
the control task by memorising surface types, so selectivity = accuracy - control accuracy says how much of the
accuracy comes from the representation rather than the probe's capacity.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from torch import Tensor
from tqdm import tqdm  # text bars: notebooks need no ipywidgets

from .config import DEFAULT_PROBE_HOOKS as DEFAULT_HOOKS
from .errors import SSLensError
from .generate import left_pad
from .model import HookedLlama, available_memory
from .tokenizer import encode_batch

if TYPE_CHECKING:
    import plotly.graph_objects as go

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # scikit-learn's C: inverse L2 strength
SMALL_FIT = 2**20  # feature entries below which a probe fits faster on one thread (`intra_op_threads`)
MIN_STORIES = 5  # the 60/20/20 split's smallest: 3 stories to fit the probe on, 1 to choose C, 1 to test
_NOT_PER_POSITION = ("hook_attn_scores", "hook_pattern")  # [batch, head, q_pos, k_pos]: no per-token pooling


@dataclass
class ProbeResult:
    """One probe: a label read from one hook of one checkpoint. Accuracies are on the held-out test stories."""

    hook: str
    step: int | None
    accuracy: float
    macro_f1: float
    majority: float  # accuracy of always answering the most frequent training label
    control_accuracy: float
    selectivity: float  # accuracy - control_accuracy
    C: float  # the regularisation strength chosen on the validation stories
    n_classes: int
    n_train: int
    n_test: int
    fit_s: float


def resolve_hooks(model: HookedLlama, patterns: Sequence[str]) -> list[str]:
    """Hook names matching the glob patterns (e.g. "blocks.*.hook_resid_post"), in the model's order."""
    names = [n for n in model.hook_dict if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise SSLensError(
            f"no hook matches {', '.join(patterns)}; hooks look like hook_embed, "
            "blocks.0.hook_resid_post, blocks.1.attn.hook_z (see `sslens model CONFIG`)"
        )
    if bad := [n for n in names if n.endswith(_NOT_PER_POSITION)]:
        raise SSLensError(
            f"{bad[0]} is [batch, head, q_pos, k_pos], not one vector per token; probe a "
            "[batch, pos, ...] activation such as hook_z or hook_resid_post"
        )
    return names


def stop_layer(hooks: Sequence[str]) -> int | None:
    """How many blocks a forward must run to reach every hook in `hooks` (None: the whole model)."""
    layers = [
        int(m.group(1)) if (m := re.match(r"blocks\.(\d+)\.", h)) else None if h == "hook_embed" else -1 for h in hooks
    ]
    return None if -1 in layers else max((l + 1 for l in layers if l is not None), default=0)


def story_tokens(model: HookedLlama, stories: Sequence[str]) -> list[list[int]]:
    """Each story's token ids without [EOS], cut to the model's context (so a longer story is probed on its first
    n_ctx tokens: its mean, or its n_ctx-th token for pool="last")."""
    if model.tokenizer is None:
        raise SSLensError("this model has no tokenizer attached, so stories cannot be encoded")
    ids = [row[: model.cfg.n_ctx] for row in encode_batch(model.tokenizer, list(stories), eos=False)]
    if empty := sum(not row for row in ids):
        raise SSLensError(f"{empty} of the stories encode to no tokens; drop empty stories first")
    return ids


@torch.inference_mode()
def harvest(
    model: HookedLlama,
    tokens: Sequence[Sequence[int]],
    hooks: Sequence[str],
    pool: str = "mean",
    batch_size: int = 32,
    spill_dir: str | Path | None = None,
    progress: str | None = None,
    on_logits: Callable[[list[int], Tensor], None] | None = None,
) -> dict[str, np.ndarray]:
    """One pooled vector per story and hook: [n_stories, features] float32 arrays (features = the activation's
    trailing dimensions flattened). Activations come from `run_with_cache` restricted to `hooks`, in batches of
    similar-length stories (left-padded), and the forward stops after the last layer needed. With `spill_dir`
    the arrays are .npy memory maps there, so a harvest larger than memory streams to disk. `on_logits(rows,
    logits)`, if given, also receives each batch's story indices and left-padded logits (from the same forward)."""
    check_harvest(pool, batch_size)
    hooks = list(hooks)
    stop = None if on_logits else stop_layer(hooks)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    out: dict[str, np.ndarray] = {}
    device = model.W_E.device
    for start in tqdm(
        range(0, len(order), batch_size),
        desc=progress or "harvest",
        disable=progress is None,
        dynamic_ncols=True,
        leave=False,
    ):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([tokens[i] for i in rows], pad=0)
        ids, mask = ids.to(device), mask.to(device)
        logits, cache = model.run_with_cache(
            ids,
            attention_mask=mask if not mask.all() else None,
            names_filter=hooks,
            return_type="logits" if on_logits else None,
            stop_at_layer=stop,
            return_cache_object=False,
        )
        if on_logits:
            on_logits(rows, logits)
        for hook in hooks:
            act = cache[hook].flatten(2).float()  # [batch, pos, features]
            pooled = mean_pool(act, mask) if pool == "mean" else act[:, -1]
            if hook not in out:
                shape, path = (
                    (len(tokens), pooled.shape[-1]),
                    None if spill_dir is None else Path(spill_dir) / f"{hook}.npy",
                )
                out[hook] = (
                    np.zeros(shape, np.float32)
                    if path is None
                    else np.lib.format.open_memmap(path, "w+", np.float32, shape)
                )
            out[hook][rows] = pooled.cpu().numpy()
    return out


def mean_pool(act: Float[Tensor, "batch pos d"], mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d"]:
    """The mean over each row's real positions (mask 1), padding left out."""
    mask = mask.to(act.device)[..., None]
    return (act * mask).sum(1) / mask.sum(1)


def check_harvest(pool: str, batch_size: int) -> None:
    if pool not in ("mean", "last"):
        raise SSLensError(f"pool must be 'mean' or 'last', not {pool!r}")
    if batch_size < 1:
        raise SSLensError(f"batch_size must be at least 1, not {batch_size}")


def story_type(story: str) -> str:
    """A story's surface type for the control task: its first word, lowercased, without punctuation."""
    words = story.split()
    return re.sub(r"\W", "", words[0].lower()) if words else ""


def control_labels(stories: Sequence[str], labels: Sequence[str], train: Sequence[int], seed: int = 0) -> list[str]:
    """Each story type gets one label drawn from the training label distribution; a story gets its type's label."""
    rng = np.random.default_rng(seed)
    counts = Counter(labels[i] for i in train)
    classes = sorted(counts)
    p = np.array([counts[c] for c in classes], dtype=float) / len(train)
    types = sorted({story_type(s) for s in stories})
    assigned = dict(zip(types, rng.choice(len(classes), size=len(types), p=p)))
    return [classes[assigned[story_type(s)]] for s in stories]


def check_labels(labels: Sequence[str]) -> None:
    """Refuse labels no probe can be fitted and tested on: too few stories for the split, or one label value."""
    if len(labels) < MIN_STORIES:
        raise SSLensError(
            f"{len(labels)} labelled stories are too few: the 60/20/20 train/validation/test split "
            f"needs at least {MIN_STORIES} (3 to fit the probe, 1 to choose C, 1 to test); use more stories"
        )
    if len(set(labels)) < 2:
        raise SSLensError("the label has fewer than two distinct values among these stories; nothing to probe")


def split(labels: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation/test story indices (60/20/20), stratified when every label has at least five stories."""
    index = np.arange(len(labels))
    stratify = np.asarray(labels) if min(Counter(labels).values()) >= 5 else None
    train, rest = train_test_split(index, test_size=0.4, random_state=seed, stratify=stratify)
    val, test = train_test_split(
        rest, test_size=0.5, random_state=seed, stratify=None if stratify is None else stratify[rest]
    )
    return train, val, test


def logistic_regression(
    x: Float[Tensor, "n feature"],
    y: Int[Tensor, " n"],
    n_classes: int,
    C: float,
    init: Float[Tensor, "feature_plus_1 class"] | None = None,
    max_iter: int = 200,
) -> Float[Tensor, "feature_plus_1 class"]:
    """Multinomial logistic regression with an intercept (the last row), minimising scikit-learn's objective
    C * sum(cross-entropy) + |W|^2 / 2 by full-batch L-BFGS; `init` warm-starts it (e.g. from a smaller C)."""
    n, d = x.shape
    x = torch.cat([x, x.new_ones(n, 1)], 1)
    w = (x.new_zeros(d + 1, n_classes) if init is None else init.clone()).requires_grad_()
    optimizer = torch.optim.LBFGS(
        [w], max_iter=max_iter, tolerance_grad=1e-5, history_size=20, line_search_fn="strong_wolfe"
    )

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(x @ w, y) + w[:-1].pow(2).sum() / (2 * C * n)
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return w.detach()


def predict(w: Float[Tensor, "feature_plus_1 class"], x: Float[Tensor, "n feature"]) -> Int[Tensor, " n"]:
    return (x @ w[:-1] + w[-1]).argmax(-1)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block. The probe's L-BFGS runs thousands of tiny ops, and on
    few cores their thread hand-offs cost more than the ops (a 150-story fit: 0.9 s on 2 threads, 0.05 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(
    features: Float[np.ndarray, "story feature"],
    labels: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
) -> tuple[float, float, float]:
    """(test accuracy, test macro-F1, C) of the probe whose C has the best validation accuracy. Features are
    standardised with the training stories' mean and deviation; the C path is walked upwards, warm-started."""
    classes, y = np.unique(labels, return_inverse=True)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    mean, std = x[train].mean(0), x[train].std(0, correction=0).clamp(min=1e-6)  # as scikit-learn's StandardScaler
    x, y = (x - mean) / std, torch.as_tensor(y)
    best, w = None, None
    with intra_op_threads(1 if x.numel() < SMALL_FIT else torch.get_num_threads()):
        for C in C_GRID:
            w = logistic_regression(x[train], y[train], len(classes), C, init=w)
            score = float((predict(w, x[val]) == y[val]).float().mean())
            if best is None or score > best[0]:
                best = (score, C, w)
    _, C, w = best
    predicted = predict(w, x[test]).numpy()
    return float((predicted == y[test].numpy()).mean()), float(f1_score(y[test], predicted, average="macro")), C


def probe_features(
    features: dict[str, np.ndarray],
    stories: Sequence[str],
    labels: Sequence[str],
    step: int | None = None,
    seed: int = 0,
    progress: str | None = None,
) -> list[ProbeResult]:
    """A probe and its control per hook, on one split of the stories shared by every hook (and every step, for the
    same seed)."""
    check_labels(labels)
    y = np.asarray(labels)
    train, val, test = split(labels, seed)
    control = np.asarray(control_labels(stories, labels, train, seed))
    majority = majority_accuracy(y, train, test)
    results = []
    for hook, x in tqdm(
        features.items(), desc=progress or "probe", disable=progress is None, dynamic_ncols=True, leave=False
    ):
        start = time.perf_counter()
        x = np.asarray(x)
        accuracy, macro_f1, C = fit(x, y, train, val, test)
        control_accuracy, _, _ = fit(x, control, train, val, test)
        results.append(
            ProbeResult(
                hook,
                step,
                accuracy,
                macro_f1,
                majority,
                control_accuracy,
                accuracy - control_accuracy,
                C,
                len(set(labels)),
                len(train),
                len(test),
                time.perf_counter() - start,
            )
        )
    return results


def majority_accuracy(labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Test accuracy of always answering the most frequent training label: the floor a probe must beat."""
    return float((labels[test] == Counter(labels[train]).most_common(1)[0][0]).mean())


def probe(
    model: HookedLlama,
    stories: Sequence[str],
    labels: Sequence[str],
    hooks: Sequence[str] = DEFAULT_HOOKS,
    pool: str = "mean",
    step: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    spill_dir: str | Path | None = None,
    progress: str | None = None,
) -> list[ProbeResult]:
    """Probe one model: harvest each hook's pooled activations over `stories`, then fit a probe and its control."""
    features = harvest(
        model, story_tokens(model, stories), resolve_hooks(model, hooks), pool, batch_size, spill_dir, progress
    )
    return probe_features(features, stories, labels, step, seed, progress)


def load_labelled(
    source: str | Path, label: str, split_name: str = "train", max_stories: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Stories and their `label` column from a story source (see `sslens.data.load_stories`); a random sample of
    `max_stories` if given. Refuses, before any model work, what no probe can be fitted and tested on."""
    from .data import load_stories

    if max_stories is not None and max_stories < MIN_STORIES:
        raise SSLensError(
            f"max_stories must be at least {MIN_STORIES}, not {max_stories}: the stories are split "
            "60/20/20 into train, validation and test, which needs 3 to fit the probe, 1 to choose C "
            "and 1 to test"
        )
    ds = load_stories(source, split_name)
    if label not in ds.column_names:
        columns = [c for c in ds.column_names if c != "story"]
        raise SSLensError(f"{source} has no label column {label!r}; its columns: {', '.join(columns) or 'none'}")
    if max_stories is not None and max_stories < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_stories))
    labels = [str(v) for v in ds[label]]
    check_labels(labels)
    return list(ds["story"]), labels


@torch.inference_mode()
def feature_widths(model: HookedLlama, hooks: Sequence[str]) -> list[int]:
    """The per-token width of each hook's activation."""
    _, cache = model.run_with_cache(
        torch.zeros(1, 1, dtype=torch.long, device=model.W_E.device),
        names_filter=list(hooks),
        return_type=None,
        return_cache_object=False,
    )
    return [cache[h][0, 0].numel() for h in hooks]


def training_data(path: str | Path) -> str | None:
    """The story source a run was trained on, for a run directory or one of its checkpoint directories."""
    from .checkpoint import read_run_config

    path = Path(path)
    run = next((d for d in (path, path.parent.parent) if (d / "config.yaml").is_file()), None)
    return None if run is None else read_run_config(run).get("data")


def spill_needed(n_stories: int, widths: Sequence[int]) -> bool:
    """Whether a harvest's arrays would take more than a quarter of the memory available now."""
    available = available_memory()
    return available is None or 4 * n_stories * sum(widths) > available / 4


def probe_steps(
    path: str | Path,
    steps: Sequence[int] | str | None,
    stories: Sequence[str],
    labels: Sequence[str],
    hooks: Sequence[str] = DEFAULT_HOOKS,
    pool: str = "mean",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> list[ProbeResult]:
    """Probe a model directory at several checkpoints: `steps` is "all" (every saved step of a run), a list of steps,
    or None (the newest checkpoint, or the one model of a checkpoint/HF directory)."""
    from .checkpoint import load_model, requested_steps

    steps = requested_steps(path, steps, "probe")
    check_harvest(pool, batch_size)
    first = load_model(path, steps[0])  # loaded, and the hooks checked, before any progress bar
    names = resolve_hooks(first, hooks)
    results = []
    for i, step in enumerate(tqdm(steps, desc="checkpoints", disable=not progress, dynamic_ncols=True)):
        model = first if i == 0 else load_model(path, step)
        with tempfile.TemporaryDirectory() as tmp:
            spill = tmp if spill_needed(len(stories), feature_widths(model, names)) else None
            results += probe(
                model,
                stories,
                labels,
                names,
                pool,
                step,
                seed,
                batch_size,
                spill,
                progress=(f"step {step}" if step is not None else "model") if progress else None,
            )
    return results


def accuracy_figure(results: Sequence[ProbeResult], title: str = "probe accuracy") -> go.Figure:
    """Plotly figure of test accuracy: against training step (one line per hook) when there are several steps, else
    against hook. Dotted: the majority-class baseline and the best control accuracy."""
    import plotly.graph_objects as go  # only here: harvesting and fitting need no plotting library

    steps = sorted({r.step for r in results}, key=lambda s: -1 if s is None else s)
    hooks = list(dict.fromkeys(r.hook for r in results))
    fig = go.Figure()
    if len(steps) > 1:
        x = [str(s) for s in steps]  # categories: a log checkpoint schedule reads evenly spaced
        for hook in hooks:
            by_step = {r.step: r.accuracy for r in results if r.hook == hook}
            fig.add_scatter(x=x, y=[by_step.get(s) for s in steps], mode="lines+markers", name=hook)
        by_step = {s: [r for r in results if r.step == s] for s in steps}
        fig.add_scatter(
            x=x,
            y=[by_step[s][0].majority for s in steps],
            mode="lines",
            name="majority class",
            line={"dash": "dot", "color": "gray"},
        )
        fig.add_scatter(
            x=x,
            y=[max(r.control_accuracy for r in by_step[s]) for s in steps],
            mode="lines",
            name="control task (best hook)",
            line={"dash": "dot", "color": "black"},
        )
        fig.update_layout(xaxis_title="training step", xaxis_type="category")
    else:
        fig.add_scatter(x=hooks, y=[r.accuracy for r in results], mode="lines+markers", name="probe")
        fig.add_scatter(
            x=hooks,
            y=[r.control_accuracy for r in results],
            mode="lines+markers",
            name="control task",
            line={"dash": "dot"},
        )
        fig.add_scatter(
            x=hooks,
            y=[results[0].majority] * len(hooks),
            mode="lines",
            name="majority class",
            line={"dash": "dot", "color": "gray"},
        )
        fig.update_layout(xaxis_title="hook")
    fig.update_layout(title=title, yaxis_title="test accuracy", yaxis_range=[0, 1], template="plotly_white")
    return fig


def write_results(results: Sequence[ProbeResult], out: str | Path, meta: dict) -> list[Path]:
    """results.csv, results.json (with `meta`: model, data, label, ...) and accuracy.html (self-contained, works
    offline) in `out`, each written atomically."""
    from .fileio import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    figure = accuracy_figure(results, f"{meta.get('label', 'label')} probe accuracy, {meta.get('model', '')}")
    files = {
        "results.csv": table.getvalue(),
        "results.json": json.dumps({**meta, "results": rows}, indent=2),
        "accuracy.html": figure.to_html(include_plotlyjs=True),
    }
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return [out / name for name in files]


def format_results(results: Sequence[ProbeResult]) -> str:
    lines = [
        f"{'step':>7}  {'hook':<28}{'accuracy':>9}{'macro-F1':>9}{'majority':>9}{'control':>9}{'select.':>9}{'C':>7}{'fit s':>7}"
    ]
    for r in results:
        lines.append(
            f"{'-' if r.step is None else r.step:>7}  {r.hook:<28}{r.accuracy:>9.3f}{r.macro_f1:>9.3f}{r.majority:>9.3f}"
            f"{r.control_accuracy:>9.3f}{r.selectivity:>9.3f}{r.C:>7g}{r.fit_s:>7.1f}"
        )
    return "\n".join(lines)
