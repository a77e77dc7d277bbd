"""Training sparse autoencoders (`sslens.sae`) on activations streamed from the model over its own stories (or read
from an on-disk store, `sslens.actstore`), resumable after an interruption.

The recipe. Both architectures encode f = act((x - b_dec) W_enc + b_enc) and decode x^ = f W_dec + b_dec.
- Inputs are scaled by one constant so that E||x||^2 = d_in (SAELens's "expected_average_only_in"); the constant is
  folded into the weights when saving, so the files take raw activations.
- W_dec's rows (one direction per latent) start random with unit norm and are kept at unit norm after every step,
  with the gradient's component along each row removed first; W_enc starts as W_dec's transpose; b_dec starts at the
  geometric median of the first buffer of activations (Weiszfeld's iteration); Adam, linear learning-rate warmup.
- TopK (Gao et al., 2024, "Scaling and evaluating sparse autoencoders"): act keeps the k largest pre-activations
  (through a ReLU). Loss: the squared error plus 1/32 of the AuxK loss, which asks the `aux_k` largest
  pre-activations of the dead latents (none fired over the last `dead_tokens` tokens) to reconstruct the residual
  error, normalised by that error's variance: dead latents get a gradient and come back.
- ReLU (Bricken et al., 2023; Conerly et al., 2024 update): act is a ReLU; loss = squared error + l1_coefficient x
  the sum of activations (times the unit decoder norms), the coefficient warmed up over the first 5% of steps.
The squared error is summed over dimensions and averaged over tokens, as SAELens's training MSE.
- A transcoder (Dunefsky et al., 2024, "Transcoders find interpretable LLM feature circuits") reads one hook and
  reconstructs another, e.g. an MLP's input to its output: f = act(x W_enc + b_enc), y^ = f W_dec + b_dec, the same
  recipe against the target y. Both sides are scaled by the constant that gives the target E||y||^2 = d_out; W_enc
  starts as random unit rows of its own; b_dec at the targets' geometric median.

An interrupted training resumes where its last saved state left off (`resume`: every `save_every` steps, the
weights, Adam's moments, the stream's buffer, position and random state, written atomically), and ends bitwise equal
to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from .data import Batches
from .errors import SSLensError
from .fileio import atomic_directory
from .model import HookedLlama
from .sae import SAEConfig, SparseAutoencoder, activations, check_hook

RESUME_FILE, RESUME_META = "resume.safetensors", "resume.json"


class ActivationStream:
    """`hook`'s activations (or several hooks' side by side), a batch of tokens at a time in shuffled order: forwards
    over token windows fill a buffer; once half of it is used, new activations replace that half and it is shuffled
    again, so a batch mixes tokens of many windows and positions. Its state is the buffer, the windows read, and the
    random generator."""

    def __init__(self, model: HookedLlama, hook: str | list[str], windows: Batches, cfg: SAEConfig):
        self.model, self.hook, self.windows, self.cfg = model, hook, windows, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.buffer = self._read(cfg.buffer_tokens)
        self.used = 0

    def _read(self, n_tokens: int) -> Float[Tensor, "n d_in"]:
        parts, have = [], 0
        while have < n_tokens:
            part = activations(self.model, self.hook, next(self.windows)[:, :-1]).flatten(0, 1).cpu()
            parts.append(part)
            have += len(part)
        return torch.cat(parts)[:n_tokens]

    def __iter__(self) -> Iterator[Float[Tensor, "batch_tokens d_in"]]:
        return self

    def state(self) -> tuple[dict[str, Tensor], dict]:
        scalars = {"position": self.windows.position, "used": self.used}
        return {"buffer": self.buffer, "gen": self.gen.get_state()}, scalars

    def load_state(self, tensors: dict[str, Tensor], scalars: dict) -> None:
        self.buffer, self.used, self.windows.position = tensors["buffer"], scalars["used"], scalars["position"]
        self.gen.set_state(tensors["gen"])

    def __next__(self) -> Float[Tensor, "batch_tokens d_in"]:
        half = len(self.buffer) // 2
        if self.used == 0 or self.used + self.cfg.batch_tokens > half:
            if self.used:
                self.buffer[:half] = self._read(half)
            self.buffer = self.buffer[torch.randperm(len(self.buffer), generator=self.gen)]
            self.used = 0
        batch = self.buffer[self.used : self.used + self.cfg.batch_tokens]
        self.used += self.cfg.batch_tokens
        return batch


def input_scale(sample: Float[Tensor, "n d_in"]) -> float:
    """The constant c with E||c x||^2 = d_in over the sample."""
    return math.sqrt(sample.shape[-1] / float(sample.pow(2).sum(-1).mean().clamp(min=1e-12)))


def losses(
    sae: SparseAutoencoder, batch: Float[Tensor, "batch d_batch"], dead: Tensor, l1_coefficient: float
) -> tuple[Tensor, dict[str, float], Tensor]:
    """The training loss of one batch (inputs, and a transcoder's targets beside them), its parts, and which latents
    fired."""
    x, y = sae.split(batch)
    pre = sae.pre_activations(x)
    f = sae.activate(pre)
    y_hat = sae.decode(f)
    mse = (y_hat - y).pow(2).sum(-1).mean()
    parts = {"mse": mse.item()}
    if sae.cfg.arch == "relu":
        sparsity = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        parts["l1"] = sparsity.item()
        loss = mse + l1_coefficient * sparsity
    else:
        loss = mse
        if int(dead.sum()) > 0:
            aux = aux_loss(sae, pre, dead, y - y_hat.detach())
            parts["aux"] = aux.item()
            loss = loss + sae.cfg.aux_coefficient * aux
    return loss, parts, (f > 0).any(0)


def aux_loss(sae: SparseAutoencoder, pre: Tensor, dead: Tensor, error: Tensor) -> Tensor:
    """AuxK: the dead latents' `aux_k` largest pre-activations reconstruct the error (without b_dec), normalised
    by the error's variance."""
    k = min(sae.cfg.aux_k or sae.cfg.d_out // 2, int(dead.sum()))
    values, indices = pre[:, dead].topk(k, dim=-1, sorted=False)
    rows = dead.nonzero().squeeze(1)[indices]  # the k latents, as rows of W_dec
    decoded = F.embedding_bag(rows, sae.W_dec, per_sample_weights=values.relu(), mode="sum")  # only k rows each
    variance = (error - error.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
    return (decoded - error).pow(2).sum(-1).mean() / variance


@torch.no_grad()
def constrain_decoder(sae: SparseAutoencoder) -> None:
    """Before a step: drop the gradient's component along each decoder row (it would only change the norm)."""
    if sae.W_dec.grad is not None:
        rows = F.normalize(sae.W_dec, dim=-1)
        sae.W_dec.grad -= (sae.W_dec.grad * rows).sum(-1, keepdim=True) * rows


def train_sae(
    model: HookedLlama,
    source: Batches | Iterator[Tensor],
    cfg: SAEConfig,
    start: SparseAutoencoder | None = None,
    progress: str | None = None,
    resume: Path | None = None,
    save_every: int = 100,
) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE on `cfg.hook_name`'s activations, streamed over token windows (`source` a Batches) or read from
    an iterator of activation batches with a `buffer` sample (`actstore.StoredActivations`). Fresh, or warm-started
    from `start` (a trained SAE, e.g. the previous checkpoint's: its weights in the scaled space, so a change in the
    activations' size does not carry over). With `resume`, the state is saved there every `save_every` steps and a
    state found there is resumed from. Returns it with the scaling folded in (it takes raw activations), and a log
    row every 50 steps."""
    for hook in cfg.hooks:
        check_hook(model, hook)
    stream = ActivationStream(model, cfg.hooks, source, cfg) if isinstance(source, Batches) else source
    scale = input_scale(stream.buffer[:, -cfg.d_out :])  # from the targets: an autoencoder's inputs
    sae = SparseAutoencoder(cfg)
    if start is None:
        sae.initialise(stream.buffer * scale)
    else:  # in the scaled space, where its decoder rows have unit norm: a folded SAE's rows have norm 1 / its scale
        sae.load_state_dict(start.rescaled(1 / float(start.W_dec.detach().norm(dim=-1).mean())).state_dict())
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    n_steps = max(1, cfg.tokens // cfg.batch_tokens)
    since_fired, log, first = torch.zeros(cfg.d_sae, dtype=torch.long), [], 0
    if resume is not None and (Path(resume) / RESUME_META).is_file():
        first, scale, since_fired, log = load_resume(Path(resume), sae, opt, stream)
    bar = tqdm(
        total=n_steps * cfg.batch_tokens, desc=progress or "sae", disable=progress is None, unit="tok", unit_scale=True
    )
    bar.update(first * cfg.batch_tokens)
    for step in range(first, n_steps):
        x = next(stream) * scale
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        l1 = cfg.l1_coefficient * min(1.0, (step + 1) / max(1, n_steps // 20))
        loss, parts, fired = train_step(sae, opt, x, since_fired >= cfg.dead_tokens, l1)
        since_fired = torch.where(fired, 0, since_fired + len(x))
        if step % 50 == 0 or step == n_steps - 1:
            log.append({"step": step, "tokens": (step + 1) * len(x), "loss": loss.item(), **parts})
        bar.update(len(x))
        if resume is not None and (step + 1) % save_every == 0 and step + 1 < n_steps:
            save_resume(Path(resume), step + 1, scale, sae, opt, stream, since_fired, log)
    bar.close()
    return sae.rescaled(1 / scale), log


def save_resume(
    path: Path, step: int, scale: float, sae: SparseAutoencoder, opt: torch.optim.Optimizer, stream, since_fired, log
) -> None:
    """Everything the steps after `step` depend on, as one directory replaced atomically."""
    stream_tensors, stream_scalars = stream.state()
    opt_state = opt.state_dict()
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()} | {"since_fired": since_fired}
    tensors |= {f"opt.{i}.{k}": v for i, moments in opt_state["state"].items() for k, v in moments.items()}
    tensors |= {f"stream.{k}": v for k, v in stream_tensors.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"cfg": asdict(sae.cfg), "step": step, "scale": scale, "log": log, "stream": stream_scalars}
    with atomic_directory(path, sum(v.numel() * v.element_size() for v in tensors.values())) as tmp:
        save_file(tensors, tmp / RESUME_FILE)
        (tmp / RESUME_META).write_text(json.dumps(meta) + "\n")


def load_resume(
    path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, stream
) -> tuple[int, float, Tensor, list[dict]]:
    """Restore what `save_resume` wrote into the freshly built SAE, optimiser and stream: (step, scale, since_fired,
    log). Refused if it was written for other settings."""
    meta = json.loads((path / RESUME_META).read_text())
    if meta["cfg"] != asdict(sae.cfg):
        changed = [k for k, v in asdict(sae.cfg).items() if meta["cfg"].get(k) != v]
        raise SSLensError(
            f"{path} holds an unfinished SAE trained with other settings ({', '.join(changed)}); "
            "use the same settings to resume it, or delete it to start again"
        )
    tensors = load_file(path / RESUME_FILE)
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    state = opt.state_dict()
    for i in state["param_groups"][0]["params"]:
        state["state"][i] = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
    opt.load_state_dict(state)
    stream.load_state({k[7:]: v for k, v in tensors.items() if k.startswith("stream.")}, meta["stream"])
    return meta["step"], meta["scale"], tensors["since_fired"], meta["log"]


def train_step(
    sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: Float[Tensor, "batch d_batch"], dead: Tensor, l1: float
) -> tuple[Tensor, dict[str, float], Tensor]:
    """One optimiser step on a batch of (scaled) activations, the decoder rows kept at unit norm: the loss, its
    parts, and which latents fired."""
    loss, parts, fired = losses(sae, x, dead, l1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    constrain_decoder(sae)
    opt.step()
    with torch.no_grad():
        sae.W_dec.copy_(F.normalize(sae.W_dec, dim=-1))
    return loss, parts, fired
