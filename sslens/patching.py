"""Activation and attribution patching, batched: the batch axis carries the patch index.

Semantics follow `transformer_lens.patching` (denoising): run the corrupt prompt with one clean activation patched
in, and score the output with a metric, reported normalised so that 0 is the corrupt run and 1 the clean run:
(patched - corrupt) / (clean - corrupt), each the metric's mean over the pairs. Where TransformerLens runs one
forward per patch, here every patch of a sweep shares batched forwards: row `i * n_pairs + j` is patch `i` on
pair `j`. Attribution patching estimates the same grid to first order, (clean - corrupt) . d metric / d activation,
from one forward and one backward on the corrupt run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import SSLensError
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
    settings: dict = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """One row per patch: its axis labels and its effect."""
        import pandas as pd

        index = itertools.product(*(self.labels[a] for a in self.axes))
        return pd.DataFrame(
            [(*i, v) for i, v in zip(index, self.values.flatten().tolist())], columns=[*self.axes, "effect"]
        )

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
        fig.update_layout(
            title=title or f"{self.method} patching: {self.sweep} (0 = corrupt, 1 = clean; {self.n_pairs} pairs)",
            xaxis_title=" x ".join(across),
            yaxis_title="layer",
            yaxis_autorange="reversed",
        )
        return fig


def patch_values(shape: Sequence[int], dims: Sequence[str], axes: Sequence[str]) -> list[tuple[int, ...]]:
    """Every patch of one hook: each combination of values of `axes` (in order)."""
    return list(itertools.product(*(range(shape[dims.index(a)]) for a in axes)))


def mask(shape: Sequence[int], dims: Sequence[str], axes: Sequence[str], values: tuple[int, ...]) -> Tensor:
    """Which entries of an activation (batch axis excluded) the patch `axes = values` replaces."""
    where = [slice(None)] * len(shape)
    for a, v in zip(axes, values):
        where[dims.index(a)] = v
    out = torch.zeros(*shape, dtype=torch.bool)
    out[tuple(where)] = True
    return out


def _hook_names(model: HookedLlama, sweep: str) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
    if sweep not in SWEEPS:
        raise SSLensError(f"unknown sweep {sweep!r}; sweeps: {', '.join(SWEEPS)}")
    hook, axes = SWEEPS[sweep]
    return [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)], DIMS[hook], axes


def _baselines(model, clean, corrupt, metric, names) -> tuple[dict, float, float]:
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=names)
        clean_metric, corrupt_metric = metric(clean_logits).mean().item(), metric(model(corrupt)).mean().item()
    if abs(clean_metric - corrupt_metric) < 1e-6:
        raise SSLensError("the metric is the same on the clean and the corrupt run: nothing to restore")
    return {n: cache[n] for n in names}, clean_metric, corrupt_metric


def _check_pair(clean: Tensor, corrupt: Tensor) -> None:
    if clean.shape != corrupt.shape:
        raise SSLensError(
            f"clean and corrupt tokens must have one shape, not {tuple(clean.shape)} and {tuple(corrupt.shape)}"
        )


def patch_hooks(
    model: HookedLlama,
    clean: Int[Tensor, "pair pos"],
    corrupt: Int[Tensor, "pair pos"],
    metric: Metric,
    names: list[str],
    dims: tuple[str, ...],
    axes: tuple[str, ...],
) -> tuple[Float[Tensor, "hook patch"], float, float]:
    """Activation patching at each hook in `names`, one patch per value of `axes`: the mean metric per patch,
    and the clean and corrupt means. Patches run `rows` at a time in one forward, each row its own patch."""
    _check_pair(clean, corrupt)
    cache, clean_metric, corrupt_metric = _baselines(model, clean, corrupt, metric, names)
    n_pairs, pos = corrupt.shape
    shape = cache[names[0]].shape[1:]
    patches = [(n, v) for n in names for v in patch_values(shape, dims, axes)]
    rows = max(1, LOGITS_BUDGET // (n_pairs * pos * model.cfg.d_vocab))
    out = []
    with torch.no_grad():
        for start in range(0, len(patches), rows):
            chunk = patches[start : start + rows]
            hooks = []
            for name in dict.fromkeys(n for n, _ in chunk):
                mine = [(r, mask(shape, dims, axes, v)) for r, (n, v) in enumerate(chunk) if n == name]
                hooks.append((name, _setter(cache[name], mine, n_pairs)))
            logits = model.run_with_hooks(corrupt.repeat(len(chunk), 1), fwd_hooks=hooks)
            out += [metric(part).mean() for part in logits.split(n_pairs)]
    return torch.stack(out).view(len(names), -1).cpu(), clean_metric, corrupt_metric


def _setter(clean: Tensor, mine: list[tuple[int, Tensor]], n_pairs: int):
    """A hook that writes the clean activation into the masked entries of its rows' patches."""
    rows = torch.tensor([r for r, _ in mine], device=clean.device)
    where = torch.stack([m for _, m in mine]).to(clean.device)[:, None]  # [patch, 1 (pair), ...]

    def hook(act: Tensor, hook) -> Tensor:
        grouped = act.clone().view(-1, n_pairs, *act.shape[1:])
        grouped[rows] = torch.where(where, clean[None], grouped[rows])
        return grouped.view(act.shape)

    return hook


def attribute_hooks(
    model: HookedLlama,
    clean: Int[Tensor, "pair pos"],
    corrupt: Int[Tensor, "pair pos"],
    metric: Metric,
    names: list[str],
    dims: tuple[str, ...],
    axes: tuple[str, ...],
) -> tuple[Float[Tensor, "hook patch"], float, float]:
    """The first-order estimate of `patch_hooks`, less the corrupt mean: (clean - corrupt) . d mean metric / d
    activation, summed over each patch's entries, from one forward and one backward on the corrupt run."""
    _check_pair(clean, corrupt)
    cache, clean_metric, corrupt_metric = _baselines(model, clean, corrupt, metric, names)
    acts = {}

    def keep(act: Tensor, hook) -> Tensor:
        acts[hook.name] = act
        return act

    def differentiable(act: Tensor, hook) -> Tensor:  # gradients flow even if the weights are frozen
        return act if act.requires_grad else act.detach().requires_grad_()

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupt, fwd_hooks=[("hook_embed", differentiable)] + [(n, keep) for n in names])
        grads = torch.autograd.grad(metric(logits).mean(), [acts[n] for n in names], allow_unused=True)
    order = [dims.index(a) for a in axes] + [i for i, d in enumerate(dims) if d not in axes]
    out = []
    for name, grad in zip(names, grads):
        delta = (cache[name] - acts[name].detach()).float()
        change = (delta * grad.float()).sum(0) if grad is not None else torch.zeros_like(delta[0])
        out.append(change.permute(order).flatten(len(axes)).sum(-1).flatten())
    return torch.stack(out).cpu(), clean_metric, corrupt_metric


def sweep(
    model: HookedLlama,
    clean: Int[Tensor, "pair pos"],
    corrupt: Int[Tensor, "pair pos"],
    metric: Metric,
    name: str = "heads",
    method: str = "activation",
) -> Patching:
    """One named sweep (`SWEEPS`) by activation or attribution patching, normalised: 0 = corrupt, 1 = clean."""
    if method not in ("activation", "attribution"):
        raise SSLensError(f"unknown method {method!r}; methods: activation, attribution")
    clean, corrupt = torch.atleast_2d(clean), torch.atleast_2d(corrupt)
    names, dims, axes = _hook_names(model, name)
    run = patch_hooks if method == "activation" else attribute_hooks
    raw, clean_metric, corrupt_metric = run(model, clean, corrupt, metric, names, dims, axes)
    # activation: the patched mean metric; attribution: the first-order change of the mean metric
    values = (raw - corrupt_metric if method == "activation" else raw) / (clean_metric - corrupt_metric)
    sizes = {"head": model.cfg.n_heads, "pos": clean.shape[1]}
    return Patching(
        sweep=name,
        method=method,
        values=values.view(model.cfg.n_layers, *(sizes[a] for a in axes)),
        axes=("layer", *axes),
        labels=axis_labels(model, clean, sizes),
        clean_metric=clean_metric,
        corrupt_metric=corrupt_metric,
        n_pairs=clean.shape[0],
    )


def axis_labels(model: HookedLlama, clean: Int[Tensor, "pair pos"], sizes: dict) -> dict[str, list[str]]:
    """Tick labels: layers, heads, and positions as "i: token" of the first clean prompt (when a tokenizer is
    attached), "i" otherwise."""
    tokens = model.to_str_tokens(clean[0]) if model.tokenizer is not None else None
    return {
        "layer": [f"L{i}" for i in range(model.cfg.n_layers)],
        "head": [f"H{i}" for i in range(sizes["head"])],
        "pos": [f"{i}: {tokens[i]}" if tokens else str(i) for i in range(sizes["pos"])],
    }
