"""The sslens explorer: one prompt seen through generation, attention and the logit lens, activation patching on
counterfactual pairs, and the latents of a run's sparse autoencoders, across checkpoints.

    streamlit run apps/explorer.py [-- --runs DIR] [--hub NAME,...]    (or SSLENS_RUNS=DIR, SSLENS_HUB=NAME,...)

The run picker lists the models under the runs root (default ./runs) and the hub models named at start (e.g.
SimpleStories/SimpleStories-5M, loaded from the Hugging Face cache, or downloaded when online). Hub names come only
from whoever starts the server, never from the page, so a visitor cannot make it download anything.

All model work goes through the sslens API (load_model, generate, run_with_cache, sslens.lens, sslens.sae); results
are cached per (model, checkpoint, prompt, settings), so moving the slider back is instant.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import os
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.subplots import make_subplots

from sslens import SSLensError, load_model
from sslens.checkpoint import find_models, refuse_outside, resolve_model, saved_steps, tokens_seen
from sslens.features import find_saes, latent_name, read_naming
from sslens.generate import prompt_ids
from sslens.lens import EXPLORE_NEW_TOKENS, Exploration, LensView, explore
from sslens.pairs import SLOT_FACTORS, pairs
from sslens.patching import LogitDiff, pair_batch, sweep
from sslens.sae import SparseAutoencoder, activations, check_hook, load_sae
from sslens.tuned_lens import find_tuned_lens, lens_file

PLOT_CONFIG = {"displayModeBar": True, "displaylogo": False}  # the toolbar: zoom, pan, download as PNG
CELL_FONT = 10  # px: plotly's automatic size shrinks the lens maps' text below legibility
WINDOW = 32  # positions the attention and lens maps show at first: wide enough to read each token's label
TOP_LATENTS = 3  # latents listed per prompt token: what a token evokes most, few enough to read down the table
SIDEBAR_CSS = "<style>section[data-testid='stSidebar'] [data-testid='stSliderTickBar'] {display: none}</style>"


HUB = "hub:"  # a picker entry naming a hub model rather than a directory under the runs root


def sources() -> tuple[Path, list[str]]:
    """The runs root and the hub model names the server was started with."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=os.environ.get("SSLENS_RUNS", "runs"))
    parser.add_argument("--hub", default=os.environ.get("SSLENS_HUB", ""))
    args = parser.parse_known_args(sys.argv[1:])[0]
    return Path(args.runs), [name.strip() for name in args.hub.split(",") if name.strip()]


@st.cache_resource(max_entries=8, show_spinner=False)
def model_at(path: str, step: int | None):
    return load_model(path, step=step)


@st.cache_data(max_entries=64, show_spinner="Running the model ...")
def analyse(
    path: str,
    step: int | None,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    lens_stamp: tuple,
) -> Exploration:
    """Everything the three panels show (see sslens.lens.explore), with the checkpoint's tuned lens if it has one
    (`lens_stamp` only keys the cache: a lens trained or trained again is read afresh)."""
    model = model_at(path, step)
    return explore(
        model,
        prompt,
        max_new_tokens,
        tuned=find_tuned_lens(path, step, model),
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p if top_p < 1 else None,
        seed=seed,
    )


def spaced(token: str) -> tuple[str, str]:
    """A WordPiece token as (the space before it, its text): "##" pieces join the word before them."""
    return ("", token[2:]) if token.startswith("##") else (" ", token)


def settings_key(*settings) -> str:
    """A widget key naming the result it describes: a widget keyed by it starts afresh (label and all) when the
    result changes, where one keyed by its name alone would keep the label the browser last showed."""
    return hashlib.sha1(repr(settings).encode()).hexdigest()[:16]


def position_labels(result: Exploration) -> list[str]:
    """Every position as "index:token"; the model's own tokens (after the prompt) are marked with a "*"."""
    return [f"{i}:{t}" + ("*" if i >= result.n_prompt else "") for i, t in enumerate(result.tokens)]


def position_window(n: int) -> slice:
    """The positions the attention and lens maps show: all of a short text; of a longer one a range the reader
    picks, at first the last WINDOW (the slider is keyed by `n`, so a new length starts from that default)."""
    if n <= WINDOW:
        return slice(0, n)
    first, last = st.slider(
        "Positions shown in the attention and logit-lens maps", 0, n - 1, (n - WINDOW, n - 1), key=f"window:{n}"
    )
    return slice(first, last + 1)


def cell_text(shown: slice) -> str:
    """The lens maps' text template: the text in each cell while cells are wide enough to read it, else only on
    hover (plotly would shrink it to dashes)."""
    return "%{text}" if shown.stop - shown.start <= WINDOW else ""


def generation_panel(result: Exploration, key: str) -> None:
    st.subheader("Generation")
    spans = [
        f"{spaced(t)[0]}<span title='p={p:.3f}' style='background: rgba(46, 139, 87, {p:.2f})'>"
        f"{html.escape(spaced(t)[1])}</span>"
        for t, p in zip(result.new_tokens, result.new_probs)
    ]
    prompt = "".join(space + html.escape(text) for space, text in map(spaced, result.prompt_tokens)).strip()
    st.markdown(f"**{prompt}**" + "".join(spans), unsafe_allow_html=True)
    st.caption("Each new token is shaded by the probability the model gave it (darker = more likely).")
    if result.new_tokens:
        choice = st.selectbox(
            "Token",
            range(len(result.new_tokens)),
            key=f"token:{key}",
            format_func=lambda i: f"{i + 1}: {result.new_tokens[i]} (p={result.new_probs[i]:.3f})",
        )
        st.table(
            [{"token": t, "probability": round(p, 4)} for t, p in result.alternatives[choice]], hide_index=True
        )  # plain HTML (a dataframe is a canvas), so a browser test can read it


def pattern_heatmap(z, labels: list[str], **style) -> go.Heatmap:
    """An attention pattern, queries down and keys across, on a 0-1 scale."""
    return go.Heatmap(z=z, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, **style)


def attention_panel(result: Exploration, shown: slice) -> None:
    st.subheader("Attention")
    pattern = result.pattern[:, :, shown, shown]
    labels = position_labels(result)[shown]
    layer = st.selectbox("Layer", range(pattern.shape[0]), key="layer")
    head = st.selectbox("Head", range(pattern.shape[1]), key="head")
    hover = "query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"
    fig = go.Figure(pattern_heatmap(pattern[layer, head], labels, hovertemplate=hover))
    fig.update_layout(
        title=f"L{layer}H{head}",
        yaxis_autorange="reversed",
        height=480,
        margin=dict(t=40, b=0),
        xaxis_title="key (the position attended to)",
        yaxis_title="query (the position attending)",
    )
    st.plotly_chart(fig, width="stretch", config=PLOT_CONFIG, key="pattern")
    heads_grid(pattern[layer], layer, labels)
    head_scores(result)


def heads_grid(pattern, layer: int, labels: list[str]) -> None:
    """Every head of one layer side by side, small."""
    n_heads = pattern.shape[0]
    grid = make_subplots(rows=1, cols=n_heads, subplot_titles=[f"H{h}" for h in range(n_heads)])
    hover = "query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"
    for h in range(n_heads):
        grid.add_trace(pattern_heatmap(pattern[h], labels, showscale=False, hovertemplate=hover), 1, h + 1)
    grid.update_yaxes(autorange="reversed", showticklabels=False)
    grid.update_xaxes(showticklabels=False, title_text="key")
    grid.update_yaxes(title_text="query", col=1)
    grid.update_layout(
        title=f"every head of layer {layer} (tokens {labels[0]} .. {labels[-1]})", height=260, margin=dict(t=60, b=0)
    )
    st.plotly_chart(grid, width="stretch", config=PLOT_CONFIG, key="grid")


def head_scores(result: Exploration) -> None:
    summary = st.selectbox("Head scores", list(result.heads), key="summary")
    scores = result.heads[summary]
    fig = go.Figure(
        go.Heatmap(
            z=scores,
            x=[f"H{h}" for h in range(scores.shape[1])],
            y=[f"L{l}" for l in range(scores.shape[0])],
            colorscale="Viridis",
        )
    )
    fig.update_layout(
        yaxis_autorange="reversed", height=260, margin=dict(t=10, b=0), xaxis_title="head", yaxis_title="layer"
    )
    st.plotly_chart(fig, width="stretch", config=PLOT_CONFIG, key="summary_plot")


def lens_stamp(path: Path | str, step: int | None) -> tuple:
    """The tuned lens file's size and modification time (empty without one): part of analyse's cache key."""
    if not isinstance(path, Path):
        return ()
    file = lens_file(path, step)
    return (file.stat().st_size, file.stat().st_mtime_ns) if file.is_file() else ()


def pick_lens(result: Exploration) -> LensView:
    """The logit lens, or the checkpoint's tuned lens when it has one and it is picked."""
    choice = st.radio(
        "Read the residual stream with",
        ["logit lens", "tuned lens"],
        horizontal=True,
        key="lens_kind",
        disabled=result.tuned_lens is None,
    )
    if result.tuned_lens is None:
        st.caption("No tuned lens at this checkpoint: `sslens lens train RUN --step N` trains one.")
    return result.tuned_lens if choice == "tuned lens" and result.tuned_lens is not None else result.lens


def logit_lens_panel(result: Exploration, shown: slice) -> None:
    """Full width, so that the WINDOW positions shown at first each have room for their top token as text."""
    st.subheader("Logit lens")
    view = pick_lens(result)
    positions = position_labels(result)
    top = [row[shown] for row in view.top_tokens]
    hover = [
        [", ".join(f"{t} {p:.2f}" for t, p in zip(ks, ps)) for ks, ps in zip(row, probs)]
        for row, probs in zip(top, view.top_probs[:, shown])
    ]
    lens_map(
        go.Heatmap(
            z=view.top_probs[:, shown, 0],
            x=positions[shown],
            y=view.labels,
            text=[[ks[0] for ks in row] for row in top],
            texttemplate=cell_text(shown),
            textfont_size=CELL_FONT,
            customdata=hover,
            hovertemplate="%{y} @ %{x}<br>%{customdata}<extra></extra>",
            colorscale="Oranges",
            zmin=0,
            zmax=1,
        ),
        "top-1 probability (text: top-1 token)",
        "position (* = generated by the model)",
        key="lens",
    )
    targets = slice(shown.start, min(shown.stop, len(positions) - 1))  # the last position has no next token
    if targets.stop > targets.start:
        target_heatmap(view, positions, targets)


def target_heatmap(view: LensView, positions: list[str], targets: slice) -> None:
    """The actual next token's probability and rank under the lens, per layer."""
    lens_map(
        go.Heatmap(
            z=view.target_probs[:, targets],
            x=positions[1:][targets],
            y=view.labels,
            text=view.target_ranks[:, targets],
            texttemplate=cell_text(targets),
            textfont_size=CELL_FONT,
            colorscale="Greens",
            zmin=0,
            zmax=1,
            hovertemplate="%{y} -> %{x}: p=%{z:.3f}, rank %{text}<extra></extra>",
        ),
        "the actual next token: probability (text: rank)",
        "the next token (* = generated by the model)",
        key="target",
    )


def lens_map(heatmap: go.Heatmap, title: str, xaxis_title: str, key: str) -> None:
    """One of the lens panel's layer x position maps, drawn in the panel's layout."""
    fig = go.Figure(heatmap)
    fig.update_layout(
        title=title, height=380, margin=dict(t=40, b=0), xaxis_title=xaxis_title, yaxis_title="residual stream read"
    )
    st.plotly_chart(fig, width="stretch", config=PLOT_CONFIG, key=key)


@st.cache_data(max_entries=32, show_spinner="Patching ...")
def patch_maps(path: str, step: int | None, factor: str, n: int, clean: str, corrupt: str) -> tuple:
    """The residual stream (layer x position role, or x position for typed prompts) and head sweeps, and what the
    metric compares."""
    model = model_at(path, step)
    if factor:
        batch = vars(pair_batch(model, pairs(factor, n, 0, model.tokenizer, max_tokens=model.cfg.n_ctx)))
    else:
        tokens = model.to_tokens(clean), model.to_tokens(corrupt)
        if tokens[0].shape != tokens[1].shape:
            raise SSLensError(
                f"the clean prompt is {tokens[0].shape[1]} tokens and the corrupt one {tokens[1].shape[1]}: "
                "patching needs prompts of the same length (change a word for one of as many tokens)"
            )
        answers = typed_answers(model, *tokens)
        batch = {"clean": tokens[0], "corrupt": tokens[1], "metric": LogitDiff(*answers)}
    a, b = ("the clean answer", "the counterfactual one") if factor else (model.to_str_tokens(t)[0] for t in answers)
    metric = f"metric: logit({a}) - logit({b}) at the last position"
    return sweep(model, **batch, name="resid_pre"), sweep(model, **batch, name="heads"), metric


def typed_answers(model, clean, corrupt) -> tuple[list[int], list[int]]:
    """The two prompts' next tokens, or where both predict the same one, the tokens the change favours most (the
    largest log-probability gain in either direction): the logit difference the maps restore."""
    with torch.no_grad():
        clean_lp, corrupt_lp = (model(t)[0, -1].log_softmax(-1) for t in (clean, corrupt))
    if torch.equal(clean, corrupt):
        raise SSLensError("the two prompts are the same: change a word in the corrupt one")
    a, b = int(clean_lp.argmax()), int(corrupt_lp.argmax())
    if a == b:
        a, b = int((clean_lp - corrupt_lp).argmax()), int((corrupt_lp - clean_lp).argmax())
    return [a], [b]


def patching_panel(path: str, step: int | None) -> None:
    """Activation patching at this checkpoint: story pairs that differ in one slot, or two prompts of one length
    (the metric: the logit difference between their next tokens)."""
    st.subheader("Patching")
    if not st.toggle("Patch counterfactual pairs at this checkpoint", key="patching"):
        return
    source = st.radio("Pairs", ["story pairs", "my prompts"], horizontal=True, key="patch_source")
    factor, n, clean, corrupt = "", 0, "", ""
    if source == "story pairs":
        factor = st.selectbox("Factor (what differs)", SLOT_FACTORS, key="patch_factor")
        n = st.slider("Pairs", 4, 64, 16, key="patch_n")
    else:
        clean = st.text_input("Clean prompt", "Mia had a good friend named Alex. One day, Mia and", key="patch_clean")
        corrupt = st.text_input(
            "Corrupt prompt", "Mia had a good friend named Leo. One day, Mia and", key="patch_corrupt"
        )
    try:
        resid, heads, metric = patch_maps(path, step, factor, n, clean, corrupt)
    except SSLensError as e:
        st.error(str(e))
        return
    st.caption(metric)
    left, right = st.columns(2)
    left.plotly_chart(resid.figure(), width="stretch", config=PLOT_CONFIG, key="patch_resid")
    right.plotly_chart(heads.figure(), width="stretch", config=PLOT_CONFIG, key="patch_heads")


def sae_stamp(directory: Path) -> tuple:
    """Each file of an SAE directory with its size and modification time: part of the cache keys, so an SAE
    trained again (save_sae replaces the directory whole) or named again is read afresh, not served stale."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file())


@st.cache_resource(max_entries=8, show_spinner=False)
def sae_at(directory: str, stamp: tuple) -> SparseAutoencoder:
    """The autoencoder in `directory`; `stamp` (sae_stamp) only keys the cache."""
    return load_sae(directory)


@st.cache_data(max_entries=16, show_spinner=False)
def sae_notes(directory: str, stamp: tuple) -> dict:
    """`sslens.features.read_naming`, cached; `stamp` (sae_stamp) only keys the cache."""
    return read_naming(directory)


@st.cache_data(max_entries=32, show_spinner="Encoding the prompt ...")
def prompt_latents(path: str, step: int | None, directory: str, stamp: tuple, prompt: str) -> tuple:
    """The prompt's tokens and every latent's activation at each [pos, d_sae], from a forward that stops after the
    SAE's hook."""
    model, sae = model_at(path, step), sae_at(directory, stamp)
    check_hook(model, sae.cfg.hook_name)
    ids = prompt_ids(model, prompt)
    with torch.inference_mode():
        x = activations(model, sae.cfg.hook_name, torch.tensor([ids]))
        if x.shape[-1] != sae.cfg.d_in:
            raise SSLensError(
                f"{directory} reads {sae.cfg.d_in} numbers per token, {sae.cfg.hook_name} has {x.shape[-1]}: "
                "it was trained on another model"
            )
        latents = sae.encode(x.to(sae.W_enc.device))[0].cpu().numpy()
    return [model.tokenizer.id_to_token(i) for i in ids], latents


def token_table(tokens: list[str], latents: np.ndarray, names: dict[int, str]) -> list[dict]:
    """Per prompt token, its TOP_LATENTS most active latents (those that fire), each as "#latent activation name"."""
    top = np.argsort(-latents, axis=1, kind="stable")[:, :TOP_LATENTS]
    rows = []
    for i, (token, ranked) in enumerate(zip(tokens, top)):
        cells = [f"#{j} {latents[i, j]:.2f} {names.get(int(j), '')}".strip() for j in ranked if latents[i, j] > 0]
        cells += [""] * (TOP_LATENTS - len(cells))
        rows.append({"position": i, "token": token} | {f"top {r + 1}": c for r, c in enumerate(cells)})
    return rows


def histogram_figure(latent: int, histograms: dict, prompt_peak: float) -> go.Figure:
    """A latent's peak activation per naming story (equal bins from 0 to its largest peak), with this prompt's
    peak marked: whether the prompt moves it as much as the stories it is named by."""
    counts, top, silent = histograms["counts"][latent], float(histograms["top"][latent]), histograms["silent"][latent]
    width = top / len(counts)
    fig = go.Figure(
        go.Bar(
            x=(np.arange(len(counts)) + 0.5) * width,
            y=counts,
            width=width,
            marker_color="teal",
            hovertemplate="peak %{x:.2f}: %{y} stories<extra></extra>",
        )
    )
    fig.add_vline(x=prompt_peak, line_dash="dash", annotation_text="this prompt's peak")
    fig.update_layout(
        title=f"#{latent}: peak activation per story ({int(silent)} of {int(counts.sum() + silent)} stories silent)",
        xaxis_title="peak activation in a story",
        yaxis_title="stories",
        height=320,
        margin=dict(t=40, b=0),
    )
    return fig


def token_activation_figure(latent: int, labels: list[str], values: np.ndarray) -> go.Figure:
    """One latent over the prompt's tokens: where in the prompt it fires, beside the table's top few per token."""
    fig = go.Figure(go.Bar(x=labels, y=values, marker_color="darkorange"))
    fig.update_layout(
        title=f"#{latent} over the prompt",
        xaxis_title="prompt token",
        yaxis_title="activation",
        height=320,
        margin=dict(t=40, b=0),
    )
    return fig


def latent_details(latent: int, latents: np.ndarray, labels: list[str], notes: dict) -> None:
    """One latent: its latents.csv row, its top contexts among the naming stories, its peak-activation histogram and
    its activation over the prompt."""
    table, contexts, histograms = notes["latents"], notes["contexts"], notes["histograms"]
    if table is not None:
        st.table(table[table["latent"] == latent], hide_index=True)
    if contexts is not None:
        st.table(contexts.get(str(latent), [{"context": "(fires on none of the naming stories)"}]), hide_index=True)
    left, right = st.columns(2)
    if histograms is not None and histograms["top"][latent] > 0:
        figure = histogram_figure(latent, histograms, float(latents[:, latent].max()))
        left.plotly_chart(figure, width="stretch", config=PLOT_CONFIG, key="feature_histogram")
    figure = token_activation_figure(latent, labels, latents[:, latent])
    right.plotly_chart(figure, width="stretch", config=PLOT_CONFIG, key="feature_tokens")


def sae_for_step(root: Path, saes: dict[str, dict[int | None, Path]], step: int | None) -> Path | None:
    """The SAE directory the Features panel reads: of the family picked (when there are several), the one trained
    on this checkpoint; None (having said which steps have one) if there is none."""
    family = st.selectbox("SAE (hook/architecture-width)", list(saes), key="sae_family") if len(saes) > 1 else ""
    family = family or next(iter(saes))
    if step not in saes[family]:
        have = ", ".join("final" if s is None else str(s) for s in sorted(saes[family], key=lambda s: s or 0))
        st.info(
            f"{family} has no SAE at {'the final weights' if step is None else f'step {step}'}; steps with one: {have}"
        )
        return None
    refuse_outside(root.resolve(), [saes[family][step]])  # the directory first: nothing outside is listed
    refuse_outside(root.resolve(), sorted(saes[family][step].iterdir()))
    return saes[family][step]


def features_panel(root: Path, path: Path, step: int | None, prompt: str) -> None:
    """The prompt through a sparse autoencoder of this checkpoint: each token's most active latents, named by story
    metadata, and one latent at a time in detail. Shown only for a model with SAEs (under MODEL/saes)."""
    try:
        refuse_outside(root.resolve(), [path / "saes"])
        saes = find_saes(path)
    except (SSLensError, OSError) as e:  # saes/ is a link out of the runs root, or a loop of links
        st.subheader("Features")
        st.error(str(e))
        return
    if not saes:
        return
    st.subheader("Features")
    try:
        directory = sae_for_step(root, saes, step)
        if directory is None:
            return
        stamp = sae_stamp(directory)
        tokens, latents = prompt_latents(str(path), step, str(directory), stamp, prompt)
        notes = sae_notes(str(directory), stamp)
    except Exception as e:  # SAE files are input too: whatever reading them raises is a message, not a crash
        first_line = str(e).partition("\n")[0][:200]
        st.error(
            str(e) if isinstance(e, SSLensError) else f"the SAE could not be read ({type(e).__name__}: {first_line})"
        )
        return
    table = notes["latents"]
    names = {} if table is None else {int(r["latent"]): latent_name(r) for r in table.to_dict("records")}
    what = "activation name (the label value it separates best, by AUROC)" if names else "activation (unnamed)"
    st.caption(
        f"{directory.relative_to(path)}: each prompt token's {TOP_LATENTS} most active latents, as #latent " + what
    )
    st.dataframe(token_table(tokens, latents, names), hide_index=True)
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    peak = latents.max(0)
    fired = [int(j) for j in np.argsort(-peak, kind="stable") if peak[j] > 0]
    if not fired:
        st.info("No latent fires on this prompt.")
        return
    latent = st.selectbox(
        "Latent (most active first)",
        fired,
        key=f"latent:{settings_key(str(directory), stamp, prompt)}",
        format_func=lambda j: f"#{j} (peak {peak[j]:.2f} at {labels[latents[:, j].argmax()]}) {names.get(j, '')}",
    )
    latent_details(latent, latents, labels, notes)


def open_model(root: Path, name: str) -> tuple[Path | str, list[int], dict[int, int]]:
    """The model directory `name` under the runs root (or a hub name), its saved steps (none for an HF directory)
    and the tokens seen at each. resolve_model has refused it first if anything loading it would open leads outside
    the root."""
    if name.startswith(HUB):
        return name.removeprefix(HUB), [], {}
    path = resolve_model(root, name)
    if not (path / "config.yaml").is_file():
        return path, [], {}
    steps = saved_steps(path)
    if not steps:
        raise SSLensError(f"{name} has no checkpoints yet")
    return path, steps, tokens_seen(path)


def step_label(step: int, seen: dict[int, int]) -> str:
    """A checkpoint as the slider shows it; a step whose metrics line was lost (a cut last line) has no token count."""
    tokens = seen.get(step)
    return f"step {step} ({tokens:,} tokens)" if isinstance(tokens, int) else f"step {step}"


def sampling_sidebar() -> tuple:
    """New tokens, temperature, top-k, top-p and seed, as the sidebar sets them."""
    return (
        st.sidebar.slider("New tokens", 0, 200, EXPLORE_NEW_TOKENS, key="max_new_tokens"),
        st.sidebar.slider("Temperature (0 = greedy)", 0.0, 2.0, 0.0, 0.1, key="temperature"),
        st.sidebar.number_input("Top-k (0 = all)", 0, 4096, 40, key="top_k"),
        st.sidebar.slider("Top-p (1 = all)", 0.05, 1.0, 1.0, 0.05, key="top_p"),
        st.sidebar.number_input("Seed", 0, 2**31 - 1, 0, key="seed"),
    )


def main() -> None:
    st.set_page_config(page_title="sslens explorer", layout="wide")
    root, hub = sources()
    st.sidebar.title("sslens explorer")
    st.sidebar.caption(f"runs root: {root}")
    st.sidebar.markdown(SIDEBAR_CSS, unsafe_allow_html=True)  # the checkpoint slider's end labels overlapped the Prompt
    names = (find_models(root) if root.is_dir() else []) + [HUB + h for h in hub]
    if not names:
        st.info(
            f"No runs under {root}. Train one (`sslens train 5M --data=synth ...`) or point the explorer at a "
            "directory of runs: `streamlit run apps/explorer.py -- --runs DIR` or SSLENS_RUNS=DIR; add published "
            "models with `-- --hub SimpleStories/SimpleStories-5M` or SSLENS_HUB."
        )
        return
    name = st.sidebar.selectbox(
        "Run", names, key="run", format_func=lambda n: f"{n.removeprefix(HUB)} (hub)" if n.startswith(HUB) else n
    )
    try:
        path, steps, seen = open_model(root, name)
    except (SSLensError, OSError) as e:
        st.warning(str(e))
        return
    step = None
    if len(steps) > 1:
        step = st.sidebar.select_slider(
            "Checkpoint", options=steps, value=steps[-1], key="step", format_func=lambda s: step_label(s, seen)
        )
        st.sidebar.caption(f"from {step_label(steps[0], seen)} to {step_label(steps[-1], seen)}")
    elif steps:
        step = steps[0]
    prompt = st.sidebar.text_area("Prompt", "Once upon a time, there was a little", key="prompt")
    max_new_tokens, temperature, top_k, top_p, seed = sampling_sidebar()
    try:
        model_at(str(path), step)
    except Exception as e:  # the files are input: whatever their loader raises is a message on the page, not a crash
        first_line = str(e).partition("\n")[0][:200]
        st.error(
            str(e) if isinstance(e, SSLensError) else f"{name} could not be loaded ({type(e).__name__}: {first_line})"
        )
        return
    if not prompt.strip():
        st.info("Type a prompt in the sidebar.")
        return
    sampling = (max_new_tokens, temperature, int(top_k), top_p, int(seed))
    panels(root, path, step, prompt, sampling)


def panels(root: Path, path: Path | str, step: int | None, prompt: str, sampling: tuple) -> None:
    """Every panel for one model, checkpoint, prompt and sampling settings."""
    settings = (str(path), step, prompt, *sampling, lens_stamp(path, step))
    try:
        result = analyse(*settings)
    except (SSLensError, OSError) as e:
        st.error(str(e))
        return
    shown = position_window(len(result.tokens))
    left, right = st.columns(2)
    with left:
        generation_panel(result, settings_key(*settings))
    with right:
        attention_panel(result, shown)
    logit_lens_panel(result, shown)
    patching_panel(str(path), step)
    if isinstance(path, Path):  # a hub model has no directory to hold SAEs
        features_panel(root, path, step, prompt)


main()
