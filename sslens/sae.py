"""Sparse autoencoders on any hook: TopK (the default) or ReLU with an L1 penalty, as SAELens defines them; their
activations (a forward restricted to the hook), their evaluation with SAELens's definitions, and SAELens's on-disk
layout. Training is `sslens.sae_train`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .data import Batches
from .errors import SSLensError
from .fileio import atomic_directory
from .model import HookedLlama
from .probe import resolve_hooks, stop_layer

ARCHS = ("topk", "relu")
# (arch, transcoder) -> cfg.json's architecture
ARCHITECTURES = {
    ("topk", False): "topk",
    ("relu", False): "standard",
    ("relu", True): "transcoder",
    ("topk", True): "topk_transcoder",
}
CFG_FILE, WEIGHTS_FILE, EVAL_FILE = "cfg.json", "sae_weights.safetensors", "eval.json"
DENSE_FRACTION = 0.1  # a latent active on more than this fraction of tokens is "dense" (SAELens's threshold)


@dataclass
class SAEConfig:
    """What an SAE is and how it is trained. `d_in` is the hook's per-token width (heads x d_head for attn.hook_z).
    A transcoder reads `hook_name` and reconstructs another hook, `hook_name_out` (d_out wide): e.g. an MLP's input
    (blocks.L.ln2.hook_normalized) to its output (blocks.L.hook_mlp_out)."""

    hook_name: str
    d_in: int
    d_sae: int = 4096
    arch: str = "topk"
    k: int = 32  # topk: latents active per token
    l1_coefficient: float = 1.0  # relu: weight of the L1 penalty (on inputs scaled to E||x||^2 = d_in)
    lr: float = 4e-4
    warmup_steps: int = 100
    batch_tokens: int = 4096
    tokens: int = 2_000_000  # training tokens
    aux_k: int = 0  # topk: dead latents the AuxK loss uses; 0 = d_out // 2
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 200_000  # a latent silent for this many training tokens counts as dead
    buffer_tokens: int = 65_536  # the shuffling buffer
    seed: int = 0
    model_name: str = ""
    step: int | None = None  # the model checkpoint's training step
    hook_name_out: str = ""  # a transcoder's target ("": an autoencoder of hook_name)
    d_out: int = 0  # the reconstruction's width (0: d_in)

    def __post_init__(self) -> None:
        self.d_out = self.d_out or self.d_in
        if self.hook_name_out == self.hook_name:
            raise SSLensError(f"a transcoder reconstructs another hook than it reads, not {self.hook_name} again")
        if not self.transcoder and self.d_out != self.d_in:
            raise SSLensError(f"an autoencoder reconstructs its input: d_out {self.d_out} must equal d_in {self.d_in}")
        if self.arch not in ARCHS:
            raise SSLensError(f"unknown SAE architecture {self.arch!r}; architectures: {', '.join(ARCHS)}")
        if self.d_sae <= 0:
            raise SSLensError(f"the SAE width must be positive, got {self.d_sae}")
        if self.arch == "topk" and not 0 < self.k < self.d_sae:
            raise SSLensError(f"k must be between 1 and the width - 1 ({self.d_sae - 1}), got {self.k}")
        for name in ("tokens", "batch_tokens", "buffer_tokens"):
            if getattr(self, name) <= 0:
                raise SSLensError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def transcoder(self) -> bool:
        return bool(self.hook_name_out)

    @property
    def hooks(self) -> list[str]:
        """The hooks an SAE's training batches hold, side by side: its input's, then a transcoder's target's."""
        return [self.hook_name] + ([self.hook_name_out] if self.transcoder else [])

    def saelens(self) -> dict:
        """cfg.json in SAELens's field names (its TopK, standard and transcoder configs), with ours under metadata.
        SAELens has no TopK transcoder: that one is written as architecture "topk_transcoder", which only sslens reads."""
        ours = {k: v for k, v in asdict(self).items() if k not in ("d_in", "d_sae", "d_out")}
        cfg = {
            "architecture": ARCHITECTURES[(self.arch, self.transcoder)],
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": not self.transcoder,
            "normalize_activations": "none",
            "reshape_activations": "hook_z" if self.hook_name.endswith("hook_z") else "none",
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name,
                "hook_head_index": None,
                "prepend_bos": False,
                "context_size": None,
                "sslens": ours,
            },
        }
        if self.arch == "topk":
            cfg |= {"k": self.k, "rescale_acts_by_decoder_norm": False}
        if self.transcoder:
            cfg |= {"d_out": self.d_out}
            cfg["metadata"]["hook_name_out"] = self.hook_name_out
        return cfg

    @classmethod
    def from_saelens(cls, cfg: dict) -> SAEConfig:
        """Ours from a SAELens cfg.json: its own fields win; our training settings come from metadata if there."""
        read = {name: key for key, name in ARCHITECTURES.items()}
        if cfg.get("architecture") not in read:
            raise SSLensError(
                f"SAE architecture {cfg.get('architecture')!r} is not one sslens reads ({', '.join(read)})"
            )
        arch, transcoder = read[cfg["architecture"]]
        known = {f.name for f in fields(cls)}
        meta = cfg.get("metadata") or {}
        ours = {k: v for k, v in (meta.get("sslens") or {}).items() if k in known}
        given = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "arch": arch, "hook_name": meta.get("hook_name", "")}
        if transcoder:
            out = meta.get("hook_name_out") or ours.get("hook_name_out")
            if not out:
                raise SSLensError("this transcoder's cfg.json names no output hook (metadata.hook_name_out)")
            given |= {"d_out": cfg["d_out"], "hook_name_out": out}
        return cls(**(ours | given | ({"k": cfg["k"]} if arch == "topk" else {})))


class SparseAutoencoder(nn.Module):
    """f = act((x - b_dec) W_enc + b_enc), x^ = f W_dec + b_dec: SAELens's parameter names, shapes and maths. A
    transcoder (as SAELens's) encodes x W_enc + b_enc (its b_dec lives in the output space) and decodes d_out wide."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """(x - b_dec) W_enc + b_enc, computed as x W_enc + (b_enc - b_dec W_enc): the same value, but b_dec's
        gradient then costs a vector product, not a full [tokens, d_sae] x [d_sae, d_in] one."""
        if self.cfg.transcoder:
            return x @ self.W_enc + self.b_enc
        return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)

    def split(self, batch: Float[Tensor, "n d_batch"]) -> tuple[Float[Tensor, "n d_in"], Float[Tensor, "n d_out"]]:
        """A training batch's inputs and targets: the same activations for an autoencoder; for a transcoder the
        batch holds both hooks side by side (`SAEConfig.hooks`)."""
        return (batch[..., : self.cfg.d_in], batch[..., self.cfg.d_in :]) if self.cfg.transcoder else (batch, batch)

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.cfg.arch == "relu":
            return pre.relu()
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activate(self.pre_activations(x))

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def initialise(self, sample: Float[Tensor, "n d_batch"]) -> None:
        """Unit-norm random decoder rows, the encoder their transpose (a transcoder's: its own unit-norm random
        rows), b_dec the geometric median of the sample's targets (a training batch, `split`)."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.W_dec.copy_(F.normalize(torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=gen), dim=-1))
        if self.cfg.transcoder:
            self.W_enc.copy_(F.normalize(torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen), dim=-1).T)
        else:
            self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.copy_(geometric_median(self.split(sample)[1].float()))

    @torch.no_grad()
    def rescaled(self, scale: float) -> SparseAutoencoder:
        """The same SAE for inputs multiplied by `scale`: fold (scale = 1 / c) or unfold (c) an input scaling c (a
        transcoder's target is scaled by the same c)."""
        out = SparseAutoencoder(self.cfg)
        out.W_enc.copy_(self.W_enc / scale)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec * scale)
        out.b_dec.copy_(self.b_dec * scale)
        return out


def geometric_median(points: Float[Tensor, "n d"], iterations: int = 50) -> Float[Tensor, " d"]:
    """The point minimising the summed Euclidean distance to `points` (Weiszfeld's iteration from the mean)."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=-1).clamp(min=1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def check_hook(model: HookedLlama, hook: str) -> None:
    """`hook` is one of the model's, and one with a vector per token (as `resolve_hooks` requires)."""
    if hook not in model.hook_dict:
        near = [h for h in model.hook_dict if h.endswith(hook.rsplit(".", 1)[-1])][:6]
        raise SSLensError(
            f"{model.cfg.model_name or 'the model'} has no hook {hook!r}"
            + (f"; hooks with that name: {', '.join(near)}" if near else "; see model.hook_dict")
        )
    resolve_hooks(model, [hook])


@torch.inference_mode()
def activations(
    model: HookedLlama, hook: str | list[str], tokens: Tensor, attention_mask: Tensor | None = None
) -> Float[Tensor, "batch pos d_in"]:
    """`hook`'s activations on a batch of token windows (or left-padded stories, with their attention mask), from
    a forward that stops after the hook's block; for a list of hooks, theirs side by side along the last axis."""
    device, hooks = model.W_E.device, [hook] if isinstance(hook, str) else hook
    _, cache = model.run_with_cache(
        tokens.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        names_filter=hooks,
        return_type=None,
        stop_at_layer=stop_layer(hooks),
        return_cache_object=False,
    )
    return torch.cat([cache[h].flatten(2).float() for h in hooks], -1)


@dataclass
class SAEEval:
    """SAELens's evaluation metrics over held-out tokens; `density` is each latent's fraction of active tokens."""

    mse: float  # squared error summed over dimensions, mean over tokens
    fvu: float  # fraction of variance unexplained: summed squared error / summed squared deviation from the mean
    l0: float  # active latents per token
    l1: float
    dead: int  # latents never active on these tokens
    dense: int  # latents active on more than 10% of them
    ce_clean: float
    ce_sae: float  # with the SAE's reconstruction spliced in at the hook
    ce_zero: float  # with the hook zero-ablated
    ce_recovered: float  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
    tokens: int
    density: list[float] = field(repr=False)


class Totals:
    """Running sums for SAEEval's reconstruction and sparsity metrics, batch by batch (the variance too: it is the
    deviation from the mean over all tokens, not per batch)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n, self.sq, self.l0, self.l1 = 0, 0.0, 0.0, 0.0
        self.x_sum, self.x_sq = torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64)
        self.active = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: Float[Tensor, "n d_in"], f: Float[Tensor, "n d_sae"], x_hat: Float[Tensor, "n d_in"]) -> None:
        x, f, x_hat = x.double().cpu(), f.double().cpu(), x_hat.double().cpu()
        self.n += len(x)
        self.sq += float((x_hat - x).pow(2).sum())
        self.l0 += float((f != 0).sum())
        self.l1 += float(f.abs().sum())
        self.x_sum += x.sum(0)
        self.x_sq += x.pow(2).sum(0)
        self.active += (f != 0).sum(0)

    def metrics(self) -> dict:
        variance = float((self.x_sq - self.x_sum.pow(2) / self.n).sum())
        density = self.active / self.n
        return {
            "mse": self.sq / self.n,
            "fvu": self.sq / variance,
            "l0": self.l0 / self.n,
            "l1": self.l1 / self.n,
            "dead": int((density == 0).sum()),
            "dense": int((density > DENSE_FRACTION).sum()),
            "tokens": self.n,
            "density": density.tolist(),
        }


@torch.inference_mode()
def evaluate_sae(model: HookedLlama, sae: SparseAutoencoder, windows: Batches, max_windows: int = 64) -> SAEEval:
    """Reconstruction, sparsity and spliced-in language-model loss on up to `max_windows` windows, in order."""
    hook, target = sae.cfg.hook_name, sae.cfg.hooks[-1]
    for name in sae.cfg.hooks:
        check_hook(model, name)
    totals = Totals(sae.cfg.d_out, sae.cfg.d_sae)
    ce = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero"), 0.0)
    n_targets, last = 0, min(windows.n_windows, max_windows)
    for start in range(0, last, windows.batch_size):
        rows = windows.windows(range(start, min(last, start + windows.batch_size))).to(model.W_E.device)
        tokens, targets = rows[:, :-1], rows[:, 1:].flatten()
        clean, cache = model.run_with_cache(tokens, names_filter=sae.cfg.hooks, return_cache_object=False)
        x, y = (cache[name].flatten(2).float().flatten(0, 1) for name in (hook, target))
        f = sae.encode(x)
        totals.add(y, f, sae.decode(f))
        for key, hooks in (("ce_clean", None), ("ce_sae", _splice(sae)), ("ce_zero", [(target, _zero)])):
            logits = (clean if hooks is None else model.run_with_hooks(tokens, fwd_hooks=hooks)).flatten(0, 1).float()
            ce[key] += float(F.cross_entropy(logits, targets, reduction="sum"))
        n_targets += len(targets)
    ce = {key: value / n_targets for key, value in ce.items()}
    gap = ce["ce_zero"] - ce["ce_clean"]
    recovered = (ce["ce_zero"] - ce["ce_sae"]) / gap if gap else float("nan")
    return SAEEval(**totals.metrics(), **ce, ce_recovered=recovered)


def _splice(sae: SparseAutoencoder) -> list[tuple[str, Callable]]:
    """Hooks that put the SAE's reconstruction in place of its target's activation (a transcoder's: computed from
    its input hook, read earlier in the same forward)."""
    read: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> Tensor:
        read["x"] = act.flatten(2).float()
        return act

    def replace(act: Tensor, hook) -> Tensor:
        return sae(read["x"] if sae.cfg.transcoder else act.flatten(2).float()).view(act.shape).to(act.dtype)

    return ([(sae.cfg.hook_name, keep)] if sae.cfg.transcoder else []) + [(sae.cfg.hooks[-1], replace)]


def _zero(act: Tensor, hook) -> Tensor:
    return torch.zeros_like(act)


def save_sae(sae: SparseAutoencoder, path: str | Path, evaluation: SAEEval | None = None, log: list | None = None):
    """SAELens's layout, written atomically as one directory: cfg.json and sae_weights.safetensors (W_enc, b_enc,
    W_dec, b_dec), with our evaluation (eval.json) and training log beside them."""
    weights = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    with atomic_directory(Path(path), sum(v.numel() * 4 for v in weights.values())) as tmp:
        save_file(weights, tmp / WEIGHTS_FILE)
        (tmp / CFG_FILE).write_text(json.dumps(sae.cfg.saelens(), indent=1) + "\n")
        if evaluation is not None:
            (tmp / EVAL_FILE).write_text(json.dumps(asdict(evaluation)) + "\n")
        if log is not None:
            (tmp / "training_log.json").write_text(json.dumps(log) + "\n")


def load_sae(path: str | Path) -> SparseAutoencoder:
    """An SAE saved by `save_sae` (or any SAELens TopK / standard SAE directory of the same layout)."""
    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise SSLensError(f"{path} is not an SAE directory (it needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
        weights = load_file(path / WEIGHTS_FILE)
    except Exception as e:
        raise SSLensError(f"{path}: unreadable SAE files ({str(e).splitlines()[0][:120]})") from None
    try:
        sae = SparseAutoencoder(SAEConfig.from_saelens(cfg))
    except (KeyError, TypeError) as e:
        raise SSLensError(f"{path}: {CFG_FILE} lacks a field SAELens writes ({e})") from None
    try:
        sae.load_state_dict(weights)
    except RuntimeError as e:
        raise SSLensError(f"{path}: weights do not match {CFG_FILE} ({str(e).splitlines()[0][:160]})") from None
    return sae


def read_eval(path: str | Path) -> SAEEval | None:
    file = Path(path) / EVAL_FILE
    return SAEEval(**json.loads(file.read_text())) if file.is_file() else None
