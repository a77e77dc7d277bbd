"""Training and evaluating tuned lenses (`lens.TunedLens`) for a run's checkpoints.

Each translator is trained, with the model frozen, so that the final norm and unembedding of the translated residual
match the model's final distribution: the loss is the KL divergence from the final distribution to the lens's,
averaged over tokens and summed over layers (the translators do not interact, so each sees only its own term), on
the run's own training windows. Adam with a linear warmup; A and b start at zero, where the tuned lens is the logit
lens. Evaluation, on held-out windows, gives each layer's KL to the final distribution and cross-entropy on the next
token for both lenses. A lens is saved beside the model it belongs to, in RUN/lenses/step_NNNNNNN (or .../final):
`tuned_lens.safetensors` and `lens_eval.csv`, written as one directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from .checkpoint import load_model, requested_steps
from .data import Batches, tokenize
from .errors import SSLensError
from .fileio import atomic_directory
from .lens import TunedLens, lens_residuals
from .model import HookedLlama
from .runcard import model_step, run_stories

LENS_FILE, EVAL_FILE = "tuned_lens.safetensors", "lens_eval.csv"
RESIDUALS = ("resid_pre", "resid_post")
LOSS_CHUNK_TOKENS = 1024  # the loss's [tokens, d_vocab] tensors stay cache-sized: a 5M step 1.4 s -> 1.0 s


def lens_dir(path: str | Path, step: int | None) -> Path:
    """Where a model's tuned lens lives: RUN/lenses/step_NNNNNNN, or RUN/lenses/final for a model without steps."""
    return Path(path) / "lenses" / ("final" if step is None else f"step_{step:07d}")


def residuals(model: HookedLlama, tokens: Tensor) -> Tensor:
    """The residuals a lens reads on a batch of windows: [layer + 1, batch, pos, d_model]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(RESIDUALS), return_type=None)
    return lens_residuals(model, cache)


def layer_losses(
    model: HookedLlama, resid: Tensor, tuned: TunedLens | None, targets: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per layer before the last, read by the logit lens or `tuned`: KL(final || lens) averaged over tokens, as the
    soft-target cross-entropy (one fused op per layer) less the final distribution's entropy (which has no
    gradient); and, given `targets`, the cross-entropy on them. One layer at a time, so one [tokens, d_vocab] tensor
    is alive at once."""
    final = model.logits_from_resid(resid[-1]).float().flatten(0, -2)
    p, log_p = final.softmax(-1), final.log_softmax(-1)
    entropy = -(p * log_p).sum(-1).mean()
    kl, ce = [], []
    for h in (resid if tuned is None else tuned(resid))[:-1]:
        logits = model.logits_from_resid(h).float().flatten(0, -2)
        kl.append(F.cross_entropy(logits, p) - entropy)
        if targets is not None:
            ce.append(F.cross_entropy(logits, targets.flatten()))
    return torch.stack(kl), torch.stack(ce) if ce else None


def train_tuned_lens(
    model: HookedLlama,
    windows: Batches,
    tokens: int = 262_144,
    lr: float = 1e-2,
    warmup_steps: int = 10,
    progress: str | None = None,
) -> tuple[TunedLens, list[dict]]:
    """A tuned lens for a frozen model, trained on `tokens` tokens of `windows`; and a log row every 10 steps."""
    lens = TunedLens(model.cfg.n_layers, model.cfg.d_model).to(model.W_E.device)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    per_step = windows.batch_size * windows.n_ctx
    n_steps, log = max(1, tokens // per_step), []
    bar = tqdm(total=n_steps * per_step, desc=progress, disable=progress is None, unit="tok", unit_scale=True)
    for step in range(n_steps):
        resid = residuals(model, next(windows)[:, :-1].to(model.W_E.device))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
        opt.zero_grad(set_to_none=True)
        parts = resid.split(max(1, LOSS_CHUNK_TOKENS // resid.shape[2]), dim=1)
        kl = torch.zeros(len(resid) - 1)
        with torch.enable_grad():
            for part in parts:  # gradients accumulate over the chunks
                chunk = layer_losses(model, part, lens)[0] * (part.shape[1] / resid.shape[1])
                chunk.sum().backward()
                kl += chunk.detach().cpu()
        opt.step()
        if step % 10 == 0 or step == n_steps - 1:
            log.append({"step": step, "tokens": (step + 1) * per_step, "kl": kl.tolist()})
        bar.update(per_step)
    bar.close()
    return lens.eval(), log


@torch.inference_mode()
def evaluate_lenses(model: HookedLlama, lens: TunedLens, windows: Batches, max_windows: int = 64) -> pd.DataFrame:
    """Per layer and lens (logit, tuned): KL from the final distribution and next-token cross-entropy, averaged over
    the tokens of up to `max_windows` held-out windows, in order. Columns: layer, lens, kl, ce."""
    labels = ["embed"] + [f"blocks.{i}" for i in range(model.cfg.n_layers)]
    totals = {name: torch.zeros(2, len(labels), dtype=torch.float64) for name in ("logit", "tuned")}
    n, last = 0, min(windows.n_windows, max_windows)
    for start in range(0, last, windows.batch_size):
        rows = windows.windows(range(start, min(last, start + windows.batch_size))).to(model.W_E.device)
        resid, targets = residuals(model, rows[:, :-1]), rows[:, 1:]
        final = F.cross_entropy(model.logits_from_resid(resid[-1]).float().flatten(0, -2), targets.flatten())
        for name, tuned in (("logit", None), ("tuned", lens)):
            kl, ce = layer_losses(model, resid, tuned, targets)
            both = torch.stack(
                [torch.cat([kl, kl.new_zeros(1)]), torch.cat([ce, final[None]])]
            )  # the last: 0, the model's
            totals[name] += both.double().cpu() * targets.numel()
        n += targets.numel()
    rows = [
        {"layer": label, "lens": name, "kl": float(t[0, i] / n), "ce": float(t[1, i] / n)}
        for name, t in totals.items()
        for i, label in enumerate(labels)
    ]
    return pd.DataFrame(rows)


def evaluation_figure(evaluation: pd.DataFrame, title: str = "logit lens and tuned lens") -> go.Figure:
    """KL from the final distribution and next-token cross-entropy per layer, one line per lens."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KL(final || lens)", "next-token cross-entropy"))
    for name, part in evaluation.groupby("lens", sort=False):
        for col, metric in enumerate(("kl", "ce"), 1):
            style = {"mode": "lines+markers", "legendgroup": name, "showlegend": col == 1}
            fig.add_scatter(x=part["layer"], y=part[metric], name=f"{name} lens", row=1, col=col, **style)
    fig.update_yaxes(title_text="nats")
    fig.update_xaxes(title_text="residual stream read")
    return fig.update_layout(title=title, height=380)


def save_tuned_lens(lens: TunedLens, path: Path, evaluation: pd.DataFrame, meta: dict) -> None:
    """The lens (safetensors, with `meta` and its shape in the header) and its evaluation (lens_eval.csv and a
    self-contained lens_eval.html), as one directory."""
    weights = {k: v.detach().contiguous().cpu() for k, v in lens.state_dict().items()}
    header = {"n_layers": str(lens.A.shape[0]), "d_model": str(lens.A.shape[1]), "meta": json.dumps(meta)}
    with atomic_directory(path, sum(v.numel() * 4 for v in weights.values())) as tmp:
        save_file(weights, tmp / LENS_FILE, metadata=header)
        (tmp / EVAL_FILE).write_text(evaluation.to_csv(index=False))
        (tmp / "lens_eval.html").write_text(evaluation_figure(evaluation).to_html(include_plotlyjs=True))


def load_tuned_lens(path: str | Path, model: HookedLlama) -> TunedLens:
    """The tuned lens saved in `path` (a `lens_dir`), checked against `model`'s shape."""
    file = Path(path) / LENS_FILE
    if not file.is_file():
        raise SSLensError(f"{path} holds no tuned lens ({LENS_FILE}); train one with `sslens lens train`")
    try:
        weights = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise SSLensError(f"{file} is unreadable (truncated or damaged: {str(e).splitlines()[0][:100]})") from None
    want = (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_model)
    if weights.get("A") is None or tuple(weights["A"].shape) != want or "b" not in weights:
        got = tuple(weights["A"].shape) if "A" in weights else "no A"
        raise SSLensError(
            f"{file} was trained for another model shape ({got}); this model needs {want} "
            "(n_layers, d_model, d_model): train a lens for it"
        )
    lens = TunedLens(model.cfg.n_layers, model.cfg.d_model)
    lens.load_state_dict(weights)
    return lens.to(model.W_E.device).eval()


def lens_file(path: str | Path, step: int | None) -> Path:
    """The file a checkpoint's tuned lens would be in (`step` None: the newest checkpoint, or the one model)."""
    return lens_dir(path, model_step(path, step)) / LENS_FILE


def find_tuned_lens(path: str | Path, step: int | None, model: HookedLlama) -> TunedLens | None:
    """The tuned lens trained for this checkpoint of a run (`step` None: the newest), or None if it has none."""
    file = lens_file(path, step)
    return load_tuned_lens(file.parent, model) if file.is_file() else None


def train_lenses(
    path: str | Path,
    steps: Sequence[int] | str | None = None,
    tokens: int = 262_144,
    data: str | None = None,
    progress: bool = False,
    batch_size: int = 8,
    out: str | Path | None = None,
) -> list[Path]:
    """A tuned lens for each requested checkpoint of a run (see `requested_steps`), trained on the run's training
    windows, evaluated on its held-out ones, saved in `lens_dir` under `out` (default: the run, where the explorer
    and `find_tuned_lens` look)."""
    steps = requested_steps(path, steps, "train lenses on")
    train, val = run_stories(path, data)
    written = []
    for step in steps:
        model = load_model(path, step).eval()
        if model.tokenizer is None:
            raise SSLensError(f"{path} has no tokenizer, so no stories can be encoded to train a lens on")
        model.requires_grad_(False)
        at = model_step(path, step)
        windows = Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, batch_size, seed=0)
        label = f"tuned lens at step {at}" if at is not None else "tuned lens"
        lens, log = train_tuned_lens(model, windows, tokens, progress=label if progress else None)
        held_out = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, batch_size)
        evaluation = evaluate_lenses(model, lens, held_out)
        target = lens_dir(out or path, at)
        save_tuned_lens(lens, target, evaluation, {"step": at, "tokens": tokens, "log": log[-1]})
        written.append(target)
    return written


def format_evaluation(evaluation: pd.DataFrame) -> str:
    """The evaluation as a markdown table: per layer, KL and cross-entropy for the logit and the tuned lens."""
    wide = evaluation.pivot(index="layer", columns="lens", values=["kl", "ce"])
    wide = wide.loc[list(dict.fromkeys(evaluation["layer"]))]  # embed first, as the lens reads them
    lines = ["| layer | KL logit | KL tuned | CE logit | CE tuned |", "|---|---|---|---|---|"]
    for layer, row in wide.iterrows():
        kl, ce = row["kl"], row["ce"]
        lines.append(f"| {layer} | {kl['logit']:.3f} | {kl['tuned']:.3f} | {ce['logit']:.3f} | {ce['tuned']:.3f} |")
    return "\n".join(lines)
