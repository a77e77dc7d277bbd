"""Speed against the tools users would otherwise run, measured as ratios in one process.

Each comparison runs both sides on the same weights, input, dtype and thread count, alternating them
repetition by repetition so that machine noise hits both; the reported ratio is the median of the
per-repetition ratios (peer time / our time: > 1 means sslens is faster).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge
from transformers import LlamaForCausalLM

from .errors import SSLensError
from .flops import flops_per_token, peak_flops
from .model import HookedLlama
from .tokenizer import placeholder_tokenizer
from .train import TrainingLoss, adamw, next_token_loss

# Each row's goal, one table (BENCHMARKS.md's "Rows" mirrors it; a test checks): the least ratio over the peer, or
# for explorer_ms the most milliseconds. Rows not listed are measured without a goal.
GOALS = {
    "forward_nohooks_vs_hf": 1.0,  # hooks cost nothing while none is attached
    "cache_vs_tl_bridge": 2.0,
    "generate_b1_compiled_vs_hf": 4.0,  # interactive generation: one story at a time
    "train_fp32*": 1.1,
    "train_bf16*": 1.5,
    "explorer_ms": 300.0,  # the explorer answers a prompt without a noticeable wait
    "explorer_tuned_lens_extra_ms": 20.0,  # reading a checkpoint's tuned lens too costs next to nothing
    "tuned_lens_train_s": 120.0,  # a tuned lens for the 5M model at its default size, on 2 CPU cores
    "patch_heads_vs_tl": 5.0,
    "attribution_vs_activation": 20.0,
    "sae_train_step": 0.5,  # on MFU (MFU_GOAL_ROWS), not on the ratio
    "sae_activation_stream_vs_forward": 0.8,
}
MFU_GOAL_ROWS = ("sae_train_step",)  # rows whose goal is the least MFU of the sslens side


def goal_of(row: str) -> float | None:
    return next((goal for pattern, goal in GOALS.items() if fnmatch.fnmatchcase(row, pattern)), None)


@dataclass
class Row:
    name: str
    ours_tok_s: float
    peer: str
    peer_tok_s: float
    ratio: float
    goal: float | None  # None: measured, no goal set
    mfu: tuple[float, float] | None = None  # (sslens, peer): model FLOPs/s over the measured matmul peak
    error: str | None = None  # why the row could not be measured (its numbers are then NaN)


def synchronize() -> None:
    """Wait for queued GPU work, so wall time covers it (nothing to wait for on CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(ours: Callable[[], object], peer: Callable[[], object], reps: int) -> tuple[list[float], list[float]]:
    """Wall times of `reps` alternating runs of each side, after one warm-up run of each."""
    ours(), peer()
    synchronize()
    t_ours, t_peer = [], []
    for i in range(reps):
        order = [(ours, t_ours), (peer, t_peer)]
        for fn, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - start)
    return t_ours, t_peer


def compare(
    name: str, ours: Callable, peer_name: str, peer: Callable, tokens: int, reps: int, goal: float | None
) -> Row:
    t_ours, t_peer = interleaved(ours, peer, reps)
    return Row(
        name,
        tokens / statistics.median(t_ours),
        peer_name,
        tokens / statistics.median(t_peer),
        statistics.median(p / o for o, p in zip(t_ours, t_peer)),
        goal,
    )


def attempt(name: str, peer: str, goal: float | None, measure: Callable[[], Row]) -> Row:
    """The row `measure` returns, or one saying why it failed (a peer that does not load under the installed
    library versions, say), so that one broken comparison does not cost the rest of the table."""
    try:
        return measure()
    except Exception as e:  # reported in the row and the table, not swallowed
        nan = float("nan")
        return Row(
            name,
            nan,
            peer,
            nan,
            nan,
            goal,
            error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160],
        )


def hf_twin(model: HookedLlama) -> LlamaForCausalLM:
    """HF's LlamaForCausalLM with the same weights, loaded from our export as a user would load it."""
    with tempfile.TemporaryDirectory() as export:
        model.save_hf(export)
        return LlamaForCausalLM.from_pretrained(export)


def bench_model(preset: str = "5M", batch: int = 8, seq: int = 512, reps: int = 5, device: str = "cpu") -> list[Row]:
    """Hook-free forward vs HF LlamaForCausalLM; full run_with_cache vs TransformerLens's TransformerBridge."""
    model = HookedLlama.from_preset(preset, seed=0).eval().to(device)
    model.tokenizer = placeholder_tokenizer(model.cfg.d_vocab)  # the bridge insists on a tokenizer
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    n = batch * seq
    with tempfile.TemporaryDirectory() as export, torch.inference_mode():
        model.save_hf(export)

        def forward() -> Row:
            hf = LlamaForCausalLM.from_pretrained(export).eval().to(device)
            return compare(
                "forward_nohooks_vs_hf",
                lambda: model(tokens),
                "HF LlamaForCausalLM (sdpa)",
                lambda: hf(tokens).logits,
                n,
                reps,
                goal_of("forward_nohooks_vs_hf"),
            )

        def cache() -> Row:
            bridge = TransformerBridge.boot_transformers(export, device=device)
            return compare(
                "cache_vs_tl_bridge",
                lambda: model.run_with_cache(tokens),
                "TransformerBridge.run_with_cache",
                lambda: bridge.run_with_cache(tokens),
                n,
                reps,
                goal_of("cache_vs_tl_bridge"),
            )

        return [
            attempt("forward_nohooks_vs_hf", "HF LlamaForCausalLM (sdpa)", goal_of("forward_nohooks_vs_hf"), forward),
            attempt("cache_vs_tl_bridge", "TransformerBridge.run_with_cache", goal_of("cache_vs_tl_bridge"), cache),
        ]


def prompt_pair(model: HookedLlama, n: int) -> tuple[Int[torch.Tensor, "1 pos"], Int[torch.Tensor, "1 pos"]]:
    """A random `n`-token clean prompt and its corrupt twin, one token changed a third of the way in."""
    clean = torch.randint(0, model.cfg.d_vocab, (1, n), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[0, n // 3] = (clean[0, n // 3] + 1) % model.cfg.d_vocab
    return clean.to(model.W_E.device), corrupt.to(model.W_E.device)


# The median prompt of 64 name pairs (`sslens data pairs --factor name --seed 0`) under the official SimpleStories
# tokenizer, in tokens (range 6-98): the length a researcher's attribution sweep runs at.
NAME_PAIR_TOKENS = 42


def bench_patching(
    preset: str = "1.25M", pos: int = 12, pair_pos: int = NAME_PAIR_TOKENS, reps: int = 3, device: str = "cpu"
) -> list[Row]:
    """A head x position activation-patching sweep, batched, against TransformerLens's one forward per patch, on a
    `pos`-token prompt; attribution patching against activation patching on the same grid, on a `pair_pos`-token
    prompt (the goal's row) and on the `pos`-token one (no goal: at a dozen tokens both methods mostly pay per-layer
    overhead). The tok/s columns count patches x tokens."""
    import transformer_lens.patching as tl

    from .patching import LogitDiff, sweep

    model = HookedLlama.from_preset(preset, seed=0).eval().to(device)
    metric = LogitDiff(torch.tensor([1]), torch.tensor([2]))

    def heads(method: str, n: int) -> Callable[[], object]:
        clean, corrupt = prompt_pair(model, n)
        return lambda: sweep(model, clean, corrupt, metric, "heads_by_pos", method)

    def tl_heads() -> object:
        clean, corrupt = prompt_pair(model, pos)
        with torch.no_grad():
            _, cache = model.run_with_cache(clean)
        return tl.get_act_patch_attn_head_out_by_pos(model, corrupt, cache, lambda logits: metric(logits).mean())

    def patches(n: int) -> int:
        return model.cfg.n_layers * model.cfg.n_heads * n * n

    batched = "activation patching, batched"
    return [
        attempt(
            name,
            peer,
            goal_of(name),
            lambda: compare(name, ours, peer, their, patches(n), reps, goal_of(name)),
        )
        for name, ours, peer, their, n in [
            (
                "patch_heads_vs_tl",
                heads("activation", pos),
                "transformer_lens.patching, a forward per patch",
                tl_heads,
                pos,
            ),
            (
                "attribution_vs_activation",
                heads("attribution", pair_pos),
                batched,
                heads("activation", pair_pos),
                pair_pos,
            ),
            (
                f"attribution_vs_activation_{pos}_tokens",
                heads("attribution", pos),
                batched,
                heads("activation", pos),
                pos,
            ),
        ]
    ]


def sae_flops_per_token(d_in: int, d_sae: int) -> float:
    """An SAE's training FLOPs per token as a dense implementation computes them: the encoder and the decoder are each
    a d_in x d_sae matmul, 2 FLOPs per weight forward and 4 backward."""
    return 6 * 2 * d_in * d_sae


def dense_topk_step(sae, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """The peer: a TopK SAE step as SAELens's training computes it, in plain PyTorch: encode (x - b_dec), keep the
    k largest in a dense tensor, decode it with a full matmul, squared error, Adam, decoder rows renormalised."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    loss = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_dec, dim=-1))


def bench_sae(
    preset: str = "5M", d_sae: int = 4096, k: int = 32, batch_tokens: int = 4096, reps: int = 3, device: str = "cpu"
) -> list[Row]:
    """A TopK SAE training step on the last block's residual stream (no dead latents), against the same step done
    densely; and streaming that hook's activations through the shuffling buffer against a plain forward (logits)
    over the same tokens."""
    import numpy as np

    from .data import Batches
    from .sae import SAEConfig, SparseAutoencoder
    from .sae_train import ActivationStream, train_step

    model = HookedLlama.from_preset(preset, seed=0).eval().to(device)
    hook, gen = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", torch.Generator().manual_seed(0)
    cfg = SAEConfig(hook, model.cfg.d_model, d_sae, k=k, batch_tokens=batch_tokens, buffer_tokens=16 * batch_tokens)
    x = torch.randn(batch_tokens, cfg.d_in, generator=gen).to(device)
    ours, peer = SparseAutoencoder(cfg).to(device), SparseAutoencoder(cfg).to(device)
    ours.initialise(x.cpu())
    peer.load_state_dict(ours.state_dict())
    opt_ours, opt_peer = torch.optim.Adam(ours.parameters()), torch.optim.Adam(peer.parameters())
    alive = torch.zeros(d_sae, dtype=torch.bool, device=device)
    step = compare(
        "sae_train_step",
        lambda: train_step(ours, opt_ours, x, alive, 0.0),
        "the same TopK step, dense, plain PyTorch",
        lambda: dense_topk_step(peer, opt_peer, x),
        batch_tokens,
        reps,
        goal_of("sae_train_step"),
    )
    per_token = sae_flops_per_token(cfg.d_in, d_sae) / peak_flops(device, torch.float32)
    step.mfu = (step.ours_tok_s * per_token, step.peer_tok_s * per_token)

    ids = np.random.default_rng(0).integers(0, model.cfg.d_vocab, 64 * cfg.buffer_tokens)
    stream = ActivationStream(model, hook, Batches(ids, model.cfg.n_ctx, 16), cfg)
    half = cfg.buffer_tokens // 2  # each pull of half the buffer forwards (and shuffles) once
    windows = torch.from_numpy(ids[:half]).view(-1, model.cfg.n_ctx).to(device)

    def forward() -> None:
        with torch.inference_mode():
            for rows in windows.split(16):
                model(rows)

    streaming = compare(
        "sae_activation_stream_vs_forward",
        lambda: [next(stream) for _ in range(half // batch_tokens)],
        "a plain forward (logits) over the same number of tokens",
        forward,
        half,
        reps,
        goal_of("sae_activation_stream_vs_forward"),
    )
    return [step, streaming]


def bench_generate(
    preset: str = "5M",
    batches: tuple[int, ...] = (1, 8),
    new_tokens: int = 200,
    top_k: int = 40,
    reps: int = 3,
    compiled: tuple[bool, ...] = (False, True),
    device: str = "cpu",
) -> list[Row]:
    """Sampling (top-k, temperature 1, no early stop) from a 16-token prompt against HF `generate`, same weights:
    sslens eager and with `compile=True` (compiled once before timing; HF stays eager, its default)."""
    from .generate import generate

    model = HookedLlama.from_preset(preset, seed=0).eval().to(device)
    hf = hf_twin(model).eval().to(device)
    rows = []
    for batch in batches:
        prompt = torch.randint(2, model.cfg.d_vocab, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
        for compile_ in compiled:
            name = f"generate_b{batch}{'_compiled' if compile_ else ''}_vs_hf"
            peer, goal = "HF generate (KV cache, top-k)", goal_of(name)
            rows.append(
                attempt(
                    name,
                    peer,
                    goal,
                    lambda: compare(
                        name,
                        lambda: generate(
                            model, prompt.tolist(), new_tokens, top_k=top_k, stop_at_eos=False, compile=compile_
                        ),
                        peer,
                        lambda: hf.generate(
                            prompt,
                            max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens,
                            do_sample=True,
                            top_k=top_k,
                            eos_token_id=None,
                            pad_token_id=0,
                        ),
                        batch * new_tokens,
                        reps,
                        goal,
                    ),
                )
            )
    return rows


def bench_explorer(
    preset: str = "5M", prompt_tokens: int = 64, max_new_tokens: int | None = None, reps: int = 5, device: str = "cpu"
) -> dict:
    """Milliseconds of the explorer's model work for one prompt (`sslens.lens.explore`: greedy continuation, cached
    run, logit lens, head scores, token probabilities) with the app's default continuation, median of `reps` after a
    warm-up; without generation; and what a tuned lens adds (median of per-repetition differences, interleaved)."""
    from .lens import EXPLORE_NEW_TOKENS, TunedLens, explore

    max_new_tokens = EXPLORE_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    model = HookedLlama.from_preset(preset, seed=0).eval().to(device)
    model.tokenizer = placeholder_tokenizer(model.cfg.d_vocab)
    gen = torch.Generator().manual_seed(0)
    prompt = " ".join(f"t{i}" for i in torch.randint(2, model.cfg.d_vocab, (prompt_tokens,), generator=gen).tolist())
    result = {}
    for name, new in (("explorer_ms", max_new_tokens), ("explorer_no_generation_ms", 0)):
        explore(model, prompt, new, temperature=0)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            explore(model, prompt, new, temperature=0)
            times.append(time.perf_counter() - start)
        result[name] = {
            "ms": 1000 * statistics.median(times),
            "goal_ms": goal_of(name),
            "prompt_tokens": prompt_tokens,
            "new_tokens": new,
        }
    tuned = TunedLens(model.cfg.n_layers, model.cfg.d_model).to(device)
    with torch.no_grad():
        tuned.A.normal_(std=0.01)
    plain, with_lens = interleaved(
        lambda: explore(model, prompt, max_new_tokens, temperature=0),
        lambda: explore(model, prompt, max_new_tokens, temperature=0, tuned=tuned),
        reps,
    )
    result["explorer_tuned_lens_extra_ms"] = {
        "ms": 1000 * statistics.median(b - a for a, b in zip(plain, with_lens)),
        "goal_ms": goal_of("explorer_tuned_lens_extra_ms"),
        "prompt_tokens": prompt_tokens,
        "new_tokens": max_new_tokens,
    }
    return result


def bench_tuned_lens_train(preset: str = "5M", tokens: int = 262_144, device: str = "cpu") -> dict:
    """Seconds to train one tuned lens at `sslens lens train`'s default size (random-token windows; the model's
    weights do not change the work), and its tokens per second."""
    import numpy as np

    from .data import Batches
    from .tuned_lens import train_tuned_lens

    model = HookedLlama.from_preset(preset, seed=0).eval().to(device).requires_grad_(False)
    ids = np.random.default_rng(0).integers(0, model.cfg.d_vocab, tokens + 64 * model.cfg.n_ctx)
    start = time.perf_counter()
    train_tuned_lens(model, Batches(ids, model.cfg.n_ctx, 8), tokens)
    synchronize()
    seconds = time.perf_counter() - start
    return {
        "tuned_lens_train_s": {
            "s": seconds,
            "tokens": tokens,
            "tok_s": tokens / seconds,
            "goal_s": goal_of("tuned_lens_train_s"),
        }
    }


def format_tuned_lens_train(result: dict) -> str:
    r = result["tuned_lens_train_s"]
    verdict = "ok" if r["s"] <= r["goal_s"] else "MISSED"
    return (
        f"{'tuned_lens_train_s':<34}{r['s']:>10,.1f} s  ({r['tokens']:,} tokens, {r['tok_s']:,.0f} tok/s; "
        f"goal <= {r['goal_s']:.0f} s [{verdict}])"
    )


def format_explorer(result: dict) -> str:
    return "\n".join(
        f"{name:<34}{r['ms']:>10,.0f} ms  ({r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens"
        + (
            f"; goal <= {r['goal_ms']:.0f} ms [{'ok' if r['ms'] <= r['goal_ms'] else 'MISSED'}])"
            if r["goal_ms"]
            else ")"
        )
        for name, r in result.items()
    )


def bench_probe(
    preset: str = "5M",
    stories: int = 64,
    seq: int = 512,
    reps: int = 3,
    fit_stories: int = 2000,
    classes: int = 48,
    device: str = "cpu",
) -> tuple[list[Row], dict]:
    """The probes' activation harvest with one hook in names_filter against caching every activation (then pooling
    the same hook), on random-token stories; and the seconds to fit one hook's probe and control (all C values) on
    d_model-wide features of partly separable classes."""
    from .probe import harvest, probe_features

    model = HookedLlama.from_preset(preset, seed=0).eval().to(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (stories, seq), generator=gen).tolist()
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"  # the last block: no layers skipped, only storage saved

    def full_cache() -> None:
        with torch.inference_mode():
            for start in range(0, stories, 32):
                _, cache = model.run_with_cache(torch.tensor(tokens[start : start + 32], device=device))
                cache[hook].mean(1)

    rows = [
        compare(
            "harvest_one_hook_vs_full_cache",
            lambda: harvest(model, tokens, [hook]),
            "run_with_cache, every hook",
            full_cache,
            stories * seq,
            reps,
            goal_of("harvest_one_hook_vs_full_cache"),
        )
    ]
    y = torch.randint(0, classes, (fit_stories,), generator=gen)  # partly separable classes, as real labels are
    centres = 0.3 * torch.randn(classes, model.cfg.d_model, generator=gen)
    features = {hook: (centres[y] + torch.randn(fit_stories, model.cfg.d_model, generator=gen)).numpy()}
    labels = [str(i) for i in y.tolist()]
    story_texts = [f"w{i % 200} story" for i in range(fit_stories)]
    result = probe_features(features, story_texts, labels)[0]
    return rows, {
        "probe_fit_s_per_hook": {
            "s": result.fit_s,
            "stories": fit_stories,
            "classes": classes,
            "features": model.cfg.d_model,
        }
    }


def _train_steps(
    model: torch.nn.Module, loss_of: Callable, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None, steps: int
) -> Callable[[], None]:
    """`steps` full training steps (forward, loss, backward, AdamW step) back to back, as the trainer runs them."""
    optimizer = adamw(model, 1e-4, (0.9, 0.95), 0.1)

    def run() -> None:
        for _ in range(steps):
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                loss = loss_of(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def bench_train(
    presets: tuple[str, ...] = ("1.25M", "5M"),
    batch: int = 8,
    seq: int = 512,
    reps: int = 3,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    compiled: tuple[bool, ...] = (False, True),
    device: str = "cpu",
) -> list[Row]:
    """Training steps against a training loop of HF LlamaForCausalLM with the same weights, batch and dtype; sslens
    eager and, as its trainer runs by default, torch.compiled (the peer stays eager, as HF's Trainer runs).

    On a GPU a repetition times 10 steps back to back, as a trainer runs them: each step is queued while the one
    before runs, where a lone synchronised step would also time the launch of its first kernels."""
    steps = 1 if device == "cpu" else 10
    rows = []
    for preset in presets:
        for dtype in dtypes:
            for compile_ in compiled:
                rows.append(_train_row(preset, dtype, compile_, batch, seq, reps, steps, device))
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()  # the row's models are gone with its frame
    return rows


def _train_row(
    preset: str, dtype: torch.dtype, compile_: bool, batch: int, seq: int, reps: int, steps: int, device: str
) -> Row:
    model = HookedLlama.from_preset(preset, seed=0).train()
    hf = hf_twin(model).train().to(device)
    model.to(device)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    amp = None if dtype == torch.float32 else dtype
    kind = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
    name = f"train_{kind}{'_compiled' if compile_ else ''}_vs_hf_{preset}"
    peer, goal = "HF LlamaForCausalLM training step", goal_of(name)
    ours = TrainingLoss(model)
    row = attempt(
        name,
        peer,
        goal,
        lambda: compare(
            name,
            _train_steps(model, torch.compile(ours) if compile_ else ours, x, y, amp, steps),
            peer,
            _train_steps(hf, lambda x, y: next_token_loss(hf(x).logits, y), x, y, amp, steps),
            batch * seq * steps,
            reps,
            goal,
        ),
    )
    per_token = flops_per_token(dataclasses.replace(model.cfg, n_ctx=seq)) / peak_flops(device, dtype)
    row.mfu = (row.ours_tok_s * per_token, row.peer_tok_s * per_token)
    return row


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SSLensError("--device cuda: this torch build or machine has no CUDA device; use --device cpu")


def train_dtypes(device: str) -> tuple[torch.dtype, ...]:
    """bf16 autocast and fp32 on CUDA; fp32 alone on CPU, where bf16 matmuls are emulated and slow without bf16 units."""
    return (torch.bfloat16, torch.float32) if device.startswith("cuda") else (torch.float32,)


def bench_suite(
    preset: str = "5M", batch: int = 8, seq: int = 512, reps: int = 7, device: str = "cpu", quick: bool = False
) -> tuple[list[Row], dict]:
    """Every comparison `sslens bench` prints: rows against peers, and the explorer and probe-fit timings.

    Training rows run in `train_dtypes(device)`. `quick`: two repetitions, 50 new tokens, nothing compiled, one warm
    explorer run, 6-token patching sweeps, a 1024-wide SAE on 1024-token batches, a tuned lens on 4,096 tokens.
    """
    check_device(device)
    reps = 2 if quick else reps
    few = max(1, reps // 2)
    rows = bench_model(preset, batch, seq, reps, device)
    rows += bench_generate(
        preset, new_tokens=50 if quick else 200, reps=few, compiled=(False,) if quick else (False, True), device=device
    )
    rows += bench_train(
        ("1.25M", preset) if preset != "1.25M" else ("1.25M",),
        batch,
        seq,
        max(2, few),
        train_dtypes(device),
        compiled=(False,) if quick else (False, True),
        device=device,
    )
    probe_rows, probe_fit = bench_probe(
        preset, stories=8 * batch, seq=seq, reps=few, fit_stories=500 if quick else 2000, device=device
    )
    explorer = bench_explorer(preset, reps=few, device=device)
    explorer |= bench_tuned_lens_train(preset, tokens=8 * 512 if quick else 262_144, device=device)
    rows += probe_rows + bench_patching(
        pos=6 if quick else 12, pair_pos=12 if quick else NAME_PAIR_TOKENS, reps=max(2, few), device=device
    )
    sae_size = {"d_sae": 1024, "batch_tokens": 1024} if quick else {}
    rows += bench_sae(preset, reps=max(2, few), device=device, **sae_size)
    return rows, explorer | probe_fit


def format_suite(rows: list[Row], extras: dict, header: str) -> str:
    from .probe import C_GRID

    fit = extras["probe_fit_s_per_hook"]
    return "\n".join(
        [
            format_rows(rows, header),
            format_explorer({k: v for k, v in extras.items() if k.startswith("explorer")}),
            format_tuned_lens_train(extras),
            f"{'probe_fit_s_per_hook':<34}{fit['s']:>10.2f} s  (probe + control, {len(C_GRID)} C values; "
            f"{fit['stories']:,} stories, {fit['classes']} classes, {fit['features']} features)",
        ]
    )


def format_rows(rows: list[Row], header: str) -> str:
    lines = [header, f"{'row':<34}{'sslens tok/s':>14}{'peer tok/s':>12}{'ratio':>8}{'goal':>7}  peer"]
    for r in rows:
        if r.error:
            lines.append(f"{r.name:<34}  not measured: {r.error}")
            continue
        on_mfu = r.name in MFU_GOAL_ROWS
        goal = "     -" if r.goal is None else f"{r.goal:>6.0%}" if on_mfu else f"{r.goal:>6.1f}x"
        achieved = r.mfu[0] if on_mfu else r.ratio
        mark = "" if r.goal is None else " [ok]" if achieved >= r.goal else " [MISSED]"
        mfu = "" if r.mfu is None else f" (MFU {r.mfu[0]:.0%} vs {r.mfu[1]:.0%})"
        lines.append(
            f"{r.name:<34}{r.ours_tok_s:>14,.0f}{r.peer_tok_s:>12,.0f}{r.ratio:>7.2f}x{goal}  {r.peer}{mark}{mfu}"
        )
    return "\n".join(lines)


def as_json(rows: list[Row]) -> dict:
    return {r.name: asdict(r) for r in rows}


def bench_data(n_stories: int = 100_000, vocab_size: int = 4096) -> dict:
    """The embedded corpus and the token pipeline: generation speed, tokenizer fit ([UNK] rate on unseen stories),
    tokens per story, tokenization speed against calling `tokenizers` directly, and how far a bag-of-words linear
    classifier gets on theme, topic and style (the labels should not live in keywords alone)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    from . import synth
    from .data import load_stories, tokenize
    from .tokenizer import encode_batch, train_tokenizer

    out: dict = {"stories": n_stories}
    synth.content()
    start, cpu = time.perf_counter(), time.process_time()
    rows = synth.generate(n_stories, seed=0)
    out["synth_stories_per_s"] = n_stories / (time.process_time() - cpu)  # one process, one core
    out["synth_wall_s"] = time.perf_counter() - start
    stories = [r["story"] for r in rows]
    unseen = [r["story"] for r in synth.generate(10_000, seed=1)]

    tok = train_tokenizer(stories, vocab_size)
    out["tokenizer_vocab"], out["tokenizer_asked"] = tok.get_vocab_size(), vocab_size
    unseen_ids = [i for ids in encode_batch(tok, unseen, eos=False) for i in ids]
    out["unk_rate_unseen"] = unseen_ids.count(0) / len(unseen_ids)

    with tempfile.TemporaryDirectory() as tmp:
        path = synth.write_rows(Path(tmp) / "s.parquet", rows)
        ds = load_stories(path)
        t_ours, t_direct = [], []
        for rep in range(2):  # alternate the two sides; a fresh cache directory each time, so nothing is reused
            start = time.perf_counter()
            stream = tokenize(ds, tok, cache_dir=Path(tmp) / f"c{rep}")
            t_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            [e.ids for e in tok.encode_batch(stories)]  # the peer: tokenizers' own parallel batch, ids in hand
            t_direct.append(time.perf_counter() - start)
        out["tokens"] = len(stream)
        out["tokens_per_story"] = len(stream) / n_stories
        out["tokenize_tok_s"] = len(stream) / min(t_ours)
        out["tokenize_vs_direct"] = min(t_direct) / min(t_ours)
        del stream

    n_fit, n_test = min(20_000, n_stories // 2), min(5_000, n_stories // 4)
    vectorizer = CountVectorizer(token_pattern=r"(?u)\b\w+\b|[^\w\s]", lowercase=True)  # punctuation counts too
    x_fit, x_test = vectorizer.fit_transform(stories[:n_fit]), vectorizer.transform(stories[-n_test:])
    for label in ("theme", "topic", "style", "feature"):
        y_fit, y_test = [r[label] for r in rows[:n_fit]], [r[label] for r in rows[-n_test:]]
        clf = LogisticRegression(max_iter=300).fit(x_fit, y_fit)
        out[f"bow_{label}_accuracy"] = float((clf.predict(x_test) == y_test).mean())
        out[f"bow_{label}_majority"] = max(y_test.count(v) for v in set(y_test)) / len(y_test)
    return out


def format_data(out: dict) -> str:
    lines = [
        f"embedded corpus, {out['stories']:,} stories",
        f"  generation               {out['synth_stories_per_s']:>10,.0f} stories/s (one core)",
        f"  tokenizer                {out['tokenizer_vocab']:>10,} entries (asked {out['tokenizer_asked']:,}); [UNK] rate on 10,000 "
        f"unseen stories {out['unk_rate_unseen']:.2e}",
        f"  tokens                   {out['tokens']:>10,} ({out['tokens_per_story']:.0f} per story, [EOS] included)",
        f"  tokenize + cache         {out['tokenize_tok_s']:>10,.0f} tokens/s = {out['tokenize_vs_direct']:.2f}x "
        f"tokenizers' encode_batch + .ids ({torch.get_num_threads()} cores)",
    ]
    for label in ("theme", "topic", "style", "feature"):
        lines.append(
            f"  bag-of-words -> {label:<8} {out[f'bow_{label}_accuracy']:>10.1%} accuracy "
            f"(majority class {out[f'bow_{label}_majority']:.1%})"
        )
    return "\n".join(lines)
