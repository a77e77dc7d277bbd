"""Activation and attribution patching, batched: the batch axis carries the patch index.

Semantics follow `transformer_lens.patching` (denoising): run the corrupt prompt with one clean activation patched
in, and score the output with a metric, reported normalised so that 0 is the corrupt run and 1 the clean run:
(patched - corrupt) / (clean - corrupt), each the metric's mean over the pairs. Where TransformerLens runs one
forward per patch, here every patch of a sweep shares batched forwards: row `i * n_pairs + j` is patch `i` on
pair `j`. Attribution patching estimates the same grid to first order, (clean - corrupt) . d metric / d activation,
from one forward (clean and corrupt rows together) and one backward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .errors import SSLensError
from .fileio import atomic_write_text
from .model import HookedLlama

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

Metric = Callable[[Float[Tensor, "pair pos d_vocab"]], Float[Tensor, " pair"]]

# What each activation's axes are, after the batch axis (TransformerLens shapes).
DIMS = {
    "hook_resid_pre": ("pos", "d_model"),
    "hook_resid_mid": ("pos", "d_model"),
    "hook_resid_post": ("pos", "d_model"),
    "hook_attn_out": ("pos", "d_model"),
    "hook_mlp_out": ("pos", "d_model"),
    "attn.hook_z": ("pos", "head", "d_head"),
    "attn.hook_pattern": ("head", "pos", "key_pos"),
    "ln_final.hook_normalized": ("pos", "d_model"),
}
# sweep name -> (the hook in every block, the axes patched one value at a time besides the layer)
SWEEPS = {
    "resid_pre": ("hook_resid_pre", ("pos",)),
    "resid_mid": ("hook_resid_mid", ("pos",)),
    "resid_post": ("hook_resid_post", ("pos",)),
    "attn_out": ("hook_attn_out", ("pos",)),
    "mlp_out": ("hook_mlp_out", ("pos",)),
    "heads": ("attn.hook_z", ("head",)),
    "heads_by_pos": ("attn.hook_z", ("head", "pos")),
    "patterns": ("attn.hook_pattern", ("head",)),
    "patterns_by_pos": ("attn.hook_pattern", ("head", "pos")),
}
LOGITS_BUDGET = 2**26  # logit entries one batched forward may hold (256 MiB in fp32)


class LogitDiff:
    """logit(clean answer) - logit(counterfactual answer) at the last position, one value per pair."""

    last_position_only = True  # the sweeps may unembed the last position alone (see PairBatch.run)

    def __init__(self, clean: Int[Tensor, " pair"], corrupt: Int[Tensor, " pair"]):
        self.clean, self.corrupt = torch.as_tensor(clean), torch.as_tensor(corrupt)

    def __call__(self, logits: Float[Tensor, "pair pos d_vocab"]) -> Float[Tensor, " pair"]:
        last = logits[:, -1].float()
        rows = torch.arange(len(last), device=last.device)
        return last[rows, self.clean.to(last.device)] - last[rows, self.corrupt.to(last.device)]


@dataclass
class Patching:
    """A sweep's normalised effects (0: the corrupt run, 1: the clean run), indexed by named axes."""

    sweep: str
    method: str  # "activation" or "attribution"
    values: Float[Tensor, "..."]  # axes: `axes`
    axes: tuple[str, ...]  # ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"), ...
    labels: dict[str, list[str]]  # tick labels per axis: "L0", "H3", "3: mia"
    clean_metric: float
    corrupt_metric: float
    n_pairs: int = 1
    step: int | None = None  # the checkpoint's training step, when known

    def frame(self) -> pd.DataFrame:
        """One row per patch: its axis labels, its effect, and the metric it restores (effect x `gap`)."""
        import pandas as pd

        index = itertools.product(*(self.labels[a] for a in self.axes))
        rows = [(*i, v, v * self.gap) for i, v in zip(index, self.values.flatten().tolist())]
        return pd.DataFrame(rows, columns=[*self.axes, "effect", "restored"])

    @property
    def gap(self) -> float:
        """clean - corrupt: the metric a full restoration gains (an effect of 1)."""
        return self.clean_metric - self.corrupt_metric

    def to_dict(self) -> dict:
        return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in vars(self).items()}

    def figure(self, title: str | None = None) -> go.Figure:
        """A heatmap (layer down, the other axis across; with head and position, one column per head-position)."""
        import plotly.graph_objects as go

        values, across = self.values.flatten(1).cpu(), self.axes[1:]
        x = [" ".join(p) for p in itertools.product(*(self.labels[a] for a in across))]
        limit = max(1.0, float(values.abs().max()))
        fig = go.Figure(
            go.Heatmap(
                z=values.numpy(),
                x=x,
                y=self.labels["layer"],
                zmin=-limit,
                zmax=limit,
                colorscale="RdBu",
                reversescale=True,
                colorbar={"title": "effect"},
                hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>",
            )
        )
        at = "" if self.step is None else f", step {self.step}"
        fig.update_layout(
            title=title or f"{self.method} patching: {self.sweep} (0 = corrupt, 1 = clean; {self.n_pairs} pairs{at})",
            xaxis_title=" x ".join(across),
            yaxis_title="layer",
            yaxis_autorange="reversed",
        )
        return fig


@dataclass
class PairBatch:
    """Clean and corrupt prompts of one shape (left-padded, with their attention mask, when lengths differ), the
    metric, and optionally position roles: which positions of each pair play which part ("mention", "last", ...)."""

    clean: Int[Tensor, "pair pos"]
    corrupt: Int[Tensor, "pair pos"]
    metric: Metric
    attention_mask: Int[Tensor, "pair pos"] | None = None
    roles: dict[str, Bool[Tensor, "pair pos"]] | None = None

    def __post_init__(self) -> None:
        self.clean, self.corrupt = torch.atleast_2d(self.clean), torch.atleast_2d(self.corrupt)
        if self.clean.shape != self.corrupt.shape:
            raise SSLensError(
                f"clean and corrupt tokens must have one shape, not {tuple(self.clean.shape)} and "
                f"{tuple(self.corrupt.shape)}"
            )

    def run(self, model: HookedLlama, tokens: Int[Tensor, "copy_pair pos"], **hooks) -> Tensor:
        """The model's logits on `tokens`, whose rows are copies of the pairs (each given the attention mask, if any).
        A metric marked `last_position_only` gets the last position's logits alone: the unembedding is two fifths
        of a 1.25M model's forward, and patching needs it at one position."""
        mask = None if self.attention_mask is None else self.attention_mask.repeat(len(tokens) // len(self.clean), 1)
        if not getattr(self.metric, "last_position_only", False):
            return model.run_with_hooks(tokens, attention_mask=mask, **hooks)
        with model.hooks(**hooks):
            resid = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
            return model.logits_from_resid(resid, slice(-1, None))


def patch_values(shape: Sequence[int], dims: Sequence[str], axes: Sequence[str], roles: dict | None) -> list[tuple]:
    """Every patch of one hook: each combination of values of `axes` (in order)."""
    return list(itertools.product(*(list(roles) if a == "role" else range(shape[dims.index(a)]) for a in axes)))


def mask(shape: Sequence[int], dims: Sequence[str], axes: Sequence[str], values: tuple, roles: dict | None) -> Tensor:
    """Which entries of an activation the patch `axes = values` replaces: [1 or pair, *shape]. A "role" axis
    picks each pair's own positions of that role."""
    out = torch.ones(1, *shape, dtype=torch.bool)
    for a, v in zip(axes, values):
        if a == "role":
            m = roles[v]
            out = out & m.view(m.shape[0], *(m.shape[1] if d == "pos" else 1 for d in dims))
        else:
            i = dims.index(a)
            out = out & (torch.arange(shape[i]) == v).view(1, *(shape[i] if j == i else 1 for j in range(len(dims))))
    return out


def _hook_names(model: HookedLlama, sweep: str, roles: dict | None) -> tuple[list[str], tuple, tuple]:
    if sweep not in SWEEPS:
        raise SSLensError(f"unknown sweep {sweep!r}; sweeps: {', '.join(SWEEPS)}")
    hook, axes = SWEEPS[sweep]
    axes = tuple("role" if a == "pos" and roles is not None else a for a in axes)
    return [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)], DIMS[hook], axes


def _clean_run(model: HookedLlama, batch: PairBatch, names: list[str]) -> tuple[dict, float]:
    """The clean run's activations at `names` and its mean metric."""
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(batch.clean, attention_mask=batch.attention_mask, names_filter=names)
    return {n: cache[n] for n in names}, batch.metric(clean_logits).mean().item()


def _checked(clean_metric: float, corrupt_metric: float) -> float:
    if abs(clean_metric - corrupt_metric) < 1e-6:
        raise SSLensError("the metric is the same on the clean and the corrupt run: nothing to restore")
    return corrupt_metric


def _baselines(model: HookedLlama, batch: PairBatch, names: list[str]) -> tuple[dict, float, float]:
    cache, clean_metric = _clean_run(model, batch, names)
    with torch.no_grad():
        corrupt_metric = batch.metric(batch.run(model, batch.corrupt)).mean().item()
    return cache, clean_metric, _checked(clean_metric, corrupt_metric)


def patch_hooks(
    model: HookedLlama, batch: PairBatch, names: list[str], dims: tuple[str, ...], axes: tuple[str, ...]
) -> tuple[Float[Tensor, "hook patch"], float, float]:
    """Activation patching at each hook in `names`, one patch per value of `axes`: the mean metric per patch,
    and the clean and corrupt means. Patches share batched forwards, each row its own patch and pair."""
    cache, clean_metric, corrupt_metric = _baselines(model, batch, names)
    n_pairs, pos = batch.corrupt.shape
    shape = cache[names[0]].shape[1:]
    patches = [(n, v) for n in names for v in patch_values(shape, dims, axes, batch.roles)]
    rows = max(1, LOGITS_BUDGET // (n_pairs * pos * model.cfg.d_vocab))
    out = []
    with torch.no_grad():
        for start in range(0, len(patches), rows):
            chunk = patches[start : start + rows]
            hooks = []
            for name in dict.fromkeys(n for n, _ in chunk):
                mine = [(r, mask(shape, dims, axes, v, batch.roles)) for r, (n, v) in enumerate(chunk) if n == name]
                hooks.append((name, _setter(cache[name], mine, n_pairs)))
            logits = batch.run(model, batch.corrupt.repeat(len(chunk), 1), fwd_hooks=hooks)
            out += [batch.metric(part).mean() for part in logits.split(n_pairs)]
    return torch.stack(out).view(len(names), -1).cpu(), clean_metric, corrupt_metric


def _setter(clean: Tensor, mine: list[tuple[int, Tensor]], n_pairs: int):
    """A hook that writes the clean activation into the masked entries of its rows' patches."""
    rows = torch.tensor([r for r, _ in mine], device=clean.device)
    where = torch.stack([m for _, m in mine]).to(clean.device)  # [patch, 1 or pair, ...]

    def hook(act: Tensor, hook) -> Tensor:
        grouped = act.clone().view(-1, n_pairs, *act.shape[1:])
        grouped[rows] = torch.where(where, clean[None], grouped[rows])
        return grouped.view(act.shape)

    return hook


def attribute_hooks(
    model: HookedLlama, batch: PairBatch, names: list[str], dims: tuple[str, ...], axes: tuple[str, ...]
) -> tuple[Float[Tensor, "hook patch"], float, float]:
    """The first-order estimate of `patch_hooks`, less the corrupt mean: (clean - corrupt) . d mean metric / d
    activation, summed over each patch's entries. One forward runs the clean and the corrupt prompts together (rows
    do not interact), and one backward differentiates the corrupt rows' metric."""
    n_pairs, acts = batch.clean.shape[0], {}

    def keep(act: Tensor, hook) -> Tensor:
        acts[hook.name] = act
        return act

    def differentiable(act: Tensor, hook) -> Tensor:  # gradients flow even if the weights are frozen
        return act if act.requires_grad else act.detach().requires_grad_()

    hooks = [("hook_embed", differentiable)] + [(n, keep) for n in names]
    with torch.enable_grad():
        both = batch.run(model, torch.cat([batch.clean, batch.corrupt]), fwd_hooks=hooks)
        corrupt = batch.metric(both[n_pairs:]).mean()
        grads = torch.autograd.grad(corrupt, [acts[n] for n in names], allow_unused=True)
    clean_metric = batch.metric(both[:n_pairs].detach()).mean().item()
    corrupt_metric = _checked(clean_metric, corrupt.item())
    out = []
    for name, grad in zip(names, grads):
        act = acts[name].detach()
        delta = (act[:n_pairs] - act[n_pairs:]).float()
        change = delta * grad[n_pairs:].float() if grad is not None else torch.zeros_like(delta)
        out.append(summed(change, dims, axes, batch.roles))
    return torch.stack(out).cpu(), clean_metric, corrupt_metric


def summed(change: Float[Tensor, "pair ..."], dims: tuple, axes: tuple, roles: dict | None) -> Float[Tensor, " patch"]:
    """`change` summed over each patch's entries (and over pairs), in `patch_values` order."""
    if "role" in axes:
        shape = change.shape[1:]
        return torch.stack(
            [(change * mask(shape, dims, axes, v, roles)).sum() for v in patch_values(shape, dims, axes, roles)]
        )
    order = [dims.index(a) for a in axes] + [i for i, d in enumerate(dims) if d not in axes]
    return change.sum(0).permute(order).flatten(len(axes)).sum(-1).flatten()


def sweep(
    model: HookedLlama,
    clean: Int[Tensor, "pair pos"],
    corrupt: Int[Tensor, "pair pos"],
    metric: Metric,
    name: str = "heads",
    method: str = "activation",
    *,
    attention_mask: Int[Tensor, "pair pos"] | None = None,
    roles: dict[str, Bool[Tensor, "pair pos"]] | None = None,
) -> Patching:
    """One named sweep (`SWEEPS`) by activation or attribution patching, normalised: 0 = corrupt, 1 = clean.
    With `roles`, positions are grouped by role across pairs (each patch: every position of one role)."""
    if method not in ("activation", "attribution"):
        raise SSLensError(f"unknown method {method!r}; methods: activation, attribution")
    batch = PairBatch(clean, corrupt, metric, attention_mask, roles)
    names, dims, axes = _hook_names(model, name, roles)
    run = patch_hooks if method == "activation" else attribute_hooks
    raw, clean_metric, corrupt_metric = run(model, batch, names, dims, axes)
    # activation: the patched mean metric; attribution: the first-order change of the mean metric
    values = (raw - corrupt_metric if method == "activation" else raw) / (clean_metric - corrupt_metric)
    labels = axis_labels(model, batch)
    return Patching(
        sweep=name,
        method=method,
        values=values.view(model.cfg.n_layers, *(len(labels[a]) for a in axes)),
        axes=("layer", *axes),
        labels=labels,
        clean_metric=clean_metric,
        corrupt_metric=corrupt_metric,
        n_pairs=batch.clean.shape[0],
    )


def axis_labels(model: HookedLlama, batch: PairBatch) -> dict[str, list[str]]:
    """Tick labels: layers, heads, roles, and positions as "i: token" of the first clean prompt (when a tokenizer
    is attached), "i" otherwise."""
    clean = batch.clean[0]
    tokens = model.to_str_tokens(clean) if model.tokenizer is not None else None
    return {
        "layer": [f"L{i}" for i in range(model.cfg.n_layers)],
        "head": [f"H{i}" for i in range(model.cfg.n_heads)],
        "pos": [f"{i}: {tokens[i]}" if tokens else str(i) for i in range(len(clean))],
        "role": list(batch.roles or {}),
    }


ROLES = ("mention", "after", "last", "other")  # see `pair_batch`


def pair_batch(model: HookedLlama, rows: Sequence[dict]) -> PairBatch:
    """Slot pairs (`sslens.pairs`) as one left-padded batch, with the logit-difference metric and position roles:
    "mention" (the earlier mentions of the slot, where clean and corrupt differ), "after" (the token after each),
    "last" (where the answer is predicted) and "other"."""
    if not rows or "clean_tokens" not in rows[0]:
        raise SSLensError("patching needs token-aligned pairs: a slot factor (name, friend, pronoun, ...)")
    width = max(len(r["clean_tokens"]) for r in rows)
    if width > model.cfg.n_ctx:
        raise SSLensError(f"a pair's prompt is {width} tokens, over the model's context of {model.cfg.n_ctx}")
    pad = [0] * width
    clean, corrupt, attention, role = [], [], [], []
    for r in rows:
        n, offset = len(r["clean_tokens"]), width - len(r["clean_tokens"])
        clean.append(pad[:offset] + r["clean_tokens"])
        corrupt.append(pad[:offset] + r["corrupt_tokens"])
        attention.append([0] * offset + [1] * n)
        mention = set(r["positions"])
        after = {p + 1 for p in mention if p + 1 not in mention}
        names = ["other"] * n
        for p in range(n):
            names[p] = "last" if p == n - 1 else "mention" if p in mention else "after" if p in after else "other"
        role.append([None] * offset + names)
    return PairBatch(
        torch.tensor(clean),
        torch.tensor(corrupt),
        LogitDiff([r["clean_answer"] for r in rows], [r["corrupt_answer"] for r in rows]),
        torch.tensor(attention),
        {name: torch.tensor([[x == name for x in pair] for pair in role]) for name in ROLES},
    )


SWEEP_GROUPS = {
    "heads": ("heads", "heads_by_pos"),
    "resid": ("resid_pre", "resid_mid", "resid_post"),
    "attn": ("attn_out", "patterns", "patterns_by_pos"),
    "mlp": ("mlp_out",),
    "all": tuple(SWEEPS),
}


def patch_steps(
    path: str | Path,
    steps: Sequence[int] | str | None,
    rows: Sequence[dict],
    sweeps: Sequence[str] = SWEEP_GROUPS["heads"],
    method: str = "activation",
    progress: bool = False,
) -> list[Patching]:
    """Each sweep over slot pairs (by role) at each requested checkpoint of a run: "all", a list of steps, or None
    (the newest)."""
    from tqdm.auto import tqdm

    from .checkpoint import load_model, requested_steps

    results = []
    for step in tqdm(requested_steps(path, steps, "patch"), desc="checkpoints", disable=not progress):
        model = load_model(path, step).eval()
        batch = pair_batch(model, rows)
        for name in sweeps:
            result = sweep(model, **vars(batch), name=name, method=method)
            result.step = step
            results.append(result)
    return results


def steps_figure(results: Sequence[Patching], top: int = 8) -> go.Figure:
    """Each sweep's `top` components against training step, one line each, in metric units: the metric restored,
    effect x (clean - corrupt). Early checkpoints barely tell the pairs apart, and there a normalised effect
    divides by almost nothing; the metric restored stays comparable from step to step."""
    import pandas as pd
    import plotly.graph_objects as go

    fig = go.Figure()
    for name in dict.fromkeys(r.sweep for r in results):
        table = pd.concat([r.frame().assign(step=r.step) for r in results if r.sweep == name])
        keys = [c for c in table.columns if c not in ("effect", "step", "restored")]
        table["component"] = table[keys].astype(str).agg(" ".join, axis=1)
        best = table.groupby("component")["restored"].apply(lambda e: e.abs().max()).nlargest(top).index
        for component in best:
            line = table[table["component"] == component]
            fig.add_scatter(x=line["step"], y=line["restored"], mode="lines+markers", name=f"{name} {component}")
    fig.update_layout(
        title="patching across training: metric restored (effect x clean-corrupt gap)",
        xaxis_title="step",
        yaxis_title="metric restored",
    )
    return fig


def format_results(results: Sequence[Patching], top: int = 3) -> str:
    """The newest checkpoint's `top` components per sweep, largest effect first."""
    lines = []
    for r in (r for r in results if r.step == results[-1].step):
        best = r.frame().sort_values("effect", key=abs, ascending=False).head(top)
        parts = [" ".join(map(str, row[:-2])) + f" {row[-2]:+.2f}" for row in best.itertuples(index=False)]
        lines.append(f"{r.sweep:>16}: " + ", ".join(parts))
    return "\n".join(lines)


def write_results(results: Sequence[Patching], out: str | Path, settings: dict) -> list[Path]:
    """results.csv (one row per component, sweep and step), results.json (the settings and every grid) and a
    self-contained index.html: the newest checkpoint's heatmaps, and the effects against step when there are
    several checkpoints. Each written atomically."""
    import json

    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([r.frame().assign(step=r.step, sweep=r.sweep, method=r.method) for r in results])
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    payload = {"settings": settings, "results": [r.to_dict() for r in results]}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1))
    figures = [r.figure() for r in results if r.step == results[-1].step]
    if len({r.step for r in results}) > 1:
        figures.append(steps_figure(results))
    html = "".join(f.to_html(full_html=False, include_plotlyjs=i == 0) for i, f in enumerate(figures))
    atomic_write_text(out / "index.html", f"<!DOCTYPE html><html><body>{html}</body></html>")
    return [out / "results.csv", out / "results.json", out / "index.html"]


def patch_heads(model: HookedLlama, batch: PairBatch, heads: Sequence[tuple[int, int]], into: str = "corrupt") -> float:
    """The normalised metric (0 = corrupt, 1 = clean) with the listed (layer, head) outputs, at every position,
    taken from the other run. into="corrupt": the clean heads patched into the corrupt run (how much do they
    restore?); into="clean": the corrupt heads patched into the clean run (how much is lost without them?)."""
    if into not in ("corrupt", "clean"):
        raise SSLensError(f"into is 'corrupt' or 'clean', not {into!r}")
    layers = sorted({layer for layer, _ in heads})
    names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    source, target = (batch.clean, batch.corrupt) if into == "corrupt" else (batch.corrupt, batch.clean)
    with torch.no_grad():
        _, clean_metric, corrupt_metric = _baselines(model, batch, names)
        _, cache = model.run_with_cache(source, attention_mask=batch.attention_mask, names_filter=names)

        def copy(act: Tensor, hook) -> Tensor:
            act = act.clone()
            chosen = [h for layer, h in heads if hook.name == f"blocks.{layer}.attn.hook_z"]
            act[:, :, chosen] = cache[hook.name][:, :, chosen]
            return act

        logits = batch.run(model, target, fwd_hooks=[(name, copy) for name in names])
    return (batch.metric(logits).mean().item() - corrupt_metric) / (clean_metric - corrupt_metric)
