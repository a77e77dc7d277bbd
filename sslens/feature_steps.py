"""Features across training: with an SAE per checkpoint (`train_saes`, each warm-started from its neighbour),
latents are matched between consecutive checkpoints by the cosine similarity of their decoder directions, and each
label value gets a "birth": the first checkpoint at which some latent separates it with AUROC >= BIRTH_AUROC.

A latent's match is the previous checkpoint's latent with the nearest decoder direction; a match is mutual when the
two are each other's nearest. Warm-starting keeps a latent's index while its direction drifts, so the cosine to the
same index is reported too: a low one marks a latent that was reused for something new.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots

from .errors import SSLensError
from .fileio import atomic_write_text
from .sae import SparseAutoencoder, load_sae

BIRTH_AUROC = 0.9


def match_latents(earlier: SparseAutoencoder, later: SparseAutoencoder) -> pd.DataFrame:
    """One row per latent of `later`: its nearest latent in `earlier` by decoder cosine ("match", "cosine"), whether
    the match is mutual, and the cosine to the latent of the same index in `earlier` (NaN if there is none)."""
    a, b = F.normalize(earlier.W_dec.detach().float(), dim=1), F.normalize(later.W_dec.detach().float(), dim=1)
    cosine = b @ a.T  # [later, earlier]
    best, back = cosine.argmax(1), cosine.argmax(0)
    n = min(len(a), len(b))
    same = torch.full((len(b),), float("nan"))
    same[:n] = (a[:n] * b[:n]).sum(1)
    return pd.DataFrame(
        {
            "latent": np.arange(len(b)),
            "match": best.numpy(),
            "cosine": cosine.max(1).values.numpy(),
            "mutual": (back[best] == torch.arange(len(b))).numpy(),
            "same_index_cosine": same.numpy(),
        }
    )


def auroc_by_step(saes: Mapping[int, Path]) -> pd.DataFrame:
    """Each step's values.csv (`features.value_table`) stacked: label, value, step, its best latent and AUROC."""
    tables = [pd.read_csv(path / "values.csv").assign(step=step) for step, path in sorted(saes.items())]
    if not tables:
        raise SSLensError("no named SAE to follow across steps: train them on labelled stories first")
    return pd.concat(tables, ignore_index=True)[["label", "value", "step", "latent", "auroc", "precision"]]


def births(table: pd.DataFrame, threshold: float = BIRTH_AUROC) -> pd.DataFrame:
    """Per label value: the first step at which its best latent reaches `threshold` (NaN if none does), that
    latent and its AUROC, whether every later step stays above the threshold, and the AUROC at the last step."""
    rows = []
    for (label, value), group in table.sort_values("step").groupby(["label", "value"], sort=True):
        above = group["auroc"] >= threshold
        first = group[above].head(1)
        born = not first.empty
        rows.append(
            {
                "label": label,
                "value": value,
                "birth_step": int(first["step"].iloc[0]) if born else np.nan,
                "latent": int(first["latent"].iloc[0]) if born else np.nan,
                "auroc_at_birth": float(first["auroc"].iloc[0]) if born else np.nan,
                "stays": bool(born and above[group["step"] >= first["step"].iloc[0]].all()),
                "last_auroc": float(group["auroc"].iloc[-1]),
            }
        )
    return pd.DataFrame(rows)


def format_births(found: pd.DataFrame) -> str:
    """Per label: how many of its values get a latent with AUROC >= BIRTH_AUROC, and from which steps."""
    lines = [f"features born (a latent with AUROC >= {BIRTH_AUROC}) per label:"]
    for label, part in found.groupby("label"):
        born = part.dropna(subset=["birth_step"])
        steps = ", ".join(f"{int(s)}: {n}" for s, n in born["birth_step"].value_counts().sort_index().items())
        lines.append(f"  {label}: {len(born)} of {len(part)} values" + (f" (births by step: {steps})" if steps else ""))
    return "\n".join(lines)


def steps_figure(table: pd.DataFrame, threshold: float = BIRTH_AUROC) -> go.Figure:
    """One panel per label: each value's best-latent AUROC against training step (thin lines) and the label's mean
    over its values (thick), with the birth threshold dashed."""
    labels = sorted(table["label"].unique())
    fig = make_subplots(rows=len(labels), cols=1, shared_xaxes=True, subplot_titles=labels, vertical_spacing=0.04)
    for row, label in enumerate(labels, 1):
        part = table[table["label"] == label]
        for value, line in part.groupby("value"):
            thin = {"mode": "lines", "line": {"width": 1}, "opacity": 0.35, "showlegend": False}
            fig.add_scatter(x=line["step"], y=line["auroc"], name=f"{label}={value}", row=row, col=1, **thin)
        mean = part.groupby("step")["auroc"].mean()
        fig.add_scatter(x=mean.index, y=mean.values, mode="lines+markers", name=f"{label} (mean)", row=row, col=1)
        fig.add_hline(y=threshold, line_dash="dash", line_color="grey", row=row, col=1)
        fig.update_yaxes(title_text="AUROC", range=[0.45, 1.02], row=row, col=1)
    fig.update_xaxes(title_text="training step", row=len(labels), col=1)
    fig.update_layout(height=260 * len(labels), title="each label value's best SAE latent across training")
    return fig


def write_feature_steps(saes: Mapping[int, Path], out: Path) -> pd.DataFrame:
    """Follow one SAE family (`features.find_saes`: step -> directory) across its checkpoints: write births.csv,
    auroc_by_step.csv, matches.csv (each latent's match at the previous step) and features_by_step.html into `out`
    (the family's directory); return the births."""
    steps = sorted(s for s in saes if s is not None)
    named = {s: saes[s] for s in steps if (saes[s] / "values.csv").is_file()}
    table = auroc_by_step(named)
    found = births(table)
    matches = [
        match_latents(load_sae(saes[a]), load_sae(saes[b])).assign(step=b, previous_step=a)
        for a, b in zip(steps, steps[1:])
    ]
    atomic_write_text(out / "births.csv", found.to_csv(index=False))
    atomic_write_text(out / "auroc_by_step.csv", table.to_csv(index=False))
    if matches:
        atomic_write_text(out / "matches.csv", pd.concat(matches, ignore_index=True).to_csv(index=False))
    atomic_write_text(out / "features_by_step.html", steps_figure(table).to_html(include_plotlyjs=True))
    return found
