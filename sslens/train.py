"""`sslens train`: the training loop, leaving behind many checkpoints for studying training dynamics.

One visible loop: data, forward, backward, clip, step, log, checkpoint. Resume is exact: weights, optimizer, data
position and RNG come back from the newest complete checkpoint, and metrics.jsonl loses the lines after it.

A step whose loss or gradient norm is not finite is skipped on the device (its update never touches the weights)
and stops training when its numbers are read. On a GPU they are read while the next step runs, so the GPU never
waits for Python between steps; validation and checkpoints still see exactly their step's weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import (
    checkpoint_steps,
    load_run_model,
    load_trainer_state,
    read_metrics,
    read_run_config,
    read_split,
    save_checkpoint,
    saved_steps,
    write_run_config,
    write_split,
)
from .config import ModelConfig, TrainConfig
from .data import Batches, Split, tokenize, train_val
from .errors import Interrupted, SSLensError
from .fileio import atomic_write_text, writing
from .flops import flops_per_token, peak_flops
from .model import HookedLlama
from .runlock import RunLock
from .tokenizer import encode, load_tokenizer, save_tokenizer, train_tokenizer

SAMPLE_PROMPT = "Once upon a time"
LAGGED_DEVICES = ("cuda",)  # where a step's loss and gradient norm are read during the next step (see `train`)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"], reduction: str = "mean"
) -> Float[Tensor, ""]:
    """Cross-entropy of each position's logits against its next token, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


class TrainingLoss(nn.Module):
    """A model and its mean next-token loss as one module, so that `torch.compile` fuses the fp32 log-softmax into
    the unembedding's output instead of writing fp32 logits (5M on CPU: steps ~5% faster, see BENCHMARKS.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Int[Tensor, "batch pos"], y: Int[Tensor, "batch pos"]) -> Float[Tensor, ""]:
        return next_token_loss(self.model(x), y)


class Mark:
    """A point in a device's timeline: on CUDA an event, which the GPU reaches after the work queued before it
    (so the time between two marks is the GPU's, pauses between steps excluded); elsewhere the wall clock."""

    def __init__(self, device: torch.device):
        self.time = time.perf_counter()
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record(torch.cuda.current_stream(device))

    def seconds_to(self, later: Mark) -> float:
        if self.event is None:
            return later.time - self.time
        later.event.synchronize()
        return self.event.elapsed_time(later.event) / 1000


@dataclass
class PendingStep:
    """A step taken, its loss and gradient norm still on the device."""

    step: int
    lr: float
    loss: Float[Tensor, ""]
    grad_norm: Float[Tensor, ""]
    began: Mark
    ended: Mark
    stop: Tensor | None = None  # under torchrun: how many ranks were signalled by this step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine down to min_lr_ratio x lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast where the device has fast bf16 (CUDA with bf16 support), else none (float32)."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not norms), fused: one kernel per group (on CPU 2.5x faster
    than foreach for 5M), and it can skip a step on the device (see `skip_if_not_finite`)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=True,
    )


def skip_if_not_finite(optimizer: torch.optim.Optimizer, loss: Tensor, grad_norm: Tensor) -> None:
    """Make the next `optimizer.step()` a no-op, on the device and without waiting for it, if the loss or the
    gradient norm is not finite: the flag fused AdamW reads (as under torch.amp.GradScaler)."""
    optimizer.found_inf = (~(loss.isfinite() & grad_norm.isfinite())).float()


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's moments and hyperparameters; how the optimizer runs (fused) stays this run's, so a checkpoint
    from an earlier sslens (foreach) or another device resumes."""
    how = [{k: g[k] for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, how):
        group.update(kept)
    for p, s in optimizer.state.items():
        s["step"] = s["step"].to(p.device, torch.float32)  # fused AdamW counts steps on the parameters' device


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """compile=auto: on where it pays. On CPU, inductor needs a C++ compiler, and its compile (about 30 s for 5M on
    2 cores) is repaid after about 150 steps at batch 8 x 512 (steps 1.18x faster)."""
    if cfg.compile != "auto":
        return cfg.compile == "true"
    return cfg.max_steps >= 200 and (device.type == "cuda" or shutil.which("g++") is not None)


def prepare_run_dir(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[Path, bool, RunLock]:
    """The run directory, locked for this process, checked, and whether this call created it. Nothing in it is
    touched before the lock is held: another process may be training there."""
    run_dir = Path(cfg.out_dir or Path("runs") / model_cfg.model_name)
    if run_dir.exists() and not run_dir.is_dir():
        raise SSLensError(f"out_dir {run_dir} is a file; choose a directory with --out_dir=DIR")
    try:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
    except OSError as e:
        raise SSLensError(f"out_dir {run_dir} is not writable ({e.strerror})") from None
    try:
        if saved_steps(run_dir) and not cfg.resume:
            raise SSLensError(f"{run_dir} already holds a run; continue it with --resume or choose another --out_dir")
        if cfg.resume and not saved_steps(run_dir):
            raise SSLensError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    except SSLensError:
        lock.release()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    for partial in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)  # a checkpoint whose writer was killed: never renamed, never used
    return run_dir, created, lock


def open_run(cfg: TrainConfig, model_cfg: ModelConfig, world: int) -> tuple[Path, bool, RunLock | None]:
    """`prepare_run_dir` on rank 0, its directory shared with every rank; rank 0 alone holds the lock."""
    held = []

    def prepare() -> tuple[Path, bool]:
        run_dir, created, lock = prepare_run_dir(cfg, model_cfg)
        held.append(lock)
        return run_dir, created

    run_dir, created = _on_rank0(world, prepare)
    return run_dir, created, (held[0] if held else None)


@contextlib.contextmanager
def removed_on_refusal(run_dir: Path, created: bool) -> Iterator[None]:
    """A run directory this call created is removed again if the run is refused or interrupted before training
    starts, so a refusal leaves nothing behind."""
    try:
        yield
    except (SSLensError, OSError):
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


class StopRequest:
    """SIGINT and SIGTERM while `train` runs. Before the loop starts there is nothing to save: a signal interrupts
    at once. In the loop, the first signal is noted; the loop finishes the optimizer step in progress, checkpoints
    it and raises `Interrupted`. A second signal exits at once: every file is written atomically, so whatever it
    cuts short is never read. Under torchrun the ranks agree through the flag reduced with each step's loss."""

    def __init__(self):
        self.signum: int | None = None
        self.in_loop = False
        self.agreed = False  # some rank's flag was set, as read from a reduced step (every rank reads the same)
        self.previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only the main thread may handle signals
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            os.write(2, b"sslens: interrupted again; exiting now (the newest complete checkpoint is kept)\n")
            os._exit(128 + signum)
        self.signum = signum
        if not self.in_loop:
            raise Interrupted("interrupted before training started; nothing to resume", signum)

    def flag(self, device: torch.device) -> Tensor:
        return torch.full((), float(self.signum is not None), device=device)  # a fill kernel: no host sync

    def stops_after_this_step(self, world: int) -> bool:
        return self.agreed if world > 1 else self.signum is not None

    def interrupted(self, step: int) -> Interrupted:
        return Interrupted(
            f"interrupted at step {step}; checkpoint saved; continue with --resume", self.signum or signal.SIGINT
        )


def check_free_space(run_dir: Path, model: HookedLlama, n_checkpoints: int) -> None:
    """Refuse to start a run whose checkpoints cannot fit: each holds fp32 weights and AdamW's two moments."""
    n_params = sum(p.numel() for p in model.parameters())
    need = n_checkpoints * 12 * n_params + (64 << 20)  # + room for metrics, tokenizer and a checkpoint being written
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise SSLensError(
            f"{run_dir} has {free / 2**30:.2f} GiB free but {n_checkpoints} checkpoints of this model need "
            f"about {need / 2**30:.2f} GiB; free space, choose another --out_dir or fewer checkpoints "
            f"(--checkpoint_schedule)"
        )


def _on_rank0(world: int, fn):
    """fn()'s result on rank 0, shared with every rank; if rank 0 refuses (SSLensError), every rank raises it
    instead of waiting for it at a barrier."""
    result, error = None, None
    if world == 1 or dist.get_rank() == 0:
        try:
            result = fn()
        except SSLensError as e:
            error = str(e)
    if world > 1:
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise SSLensError(error)
    return result


def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun, joins the process group: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train(model_cfg: ModelConfig, cfg: TrainConfig, device: str | None = None) -> Path:
    """Train, checkpointing on the schedule, and return the run directory. Under torchrun every rank takes its
    slice of each global batch (batch_size per rank); rank 0 alone writes the tokenizer, checkpoints and logs, and
    holds the run directory's lock. SIGINT or SIGTERM stops after the current step with a checkpoint of it
    (`StopRequest`), raising `Interrupted`."""
    rank, world = distributed()
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        with StopRequest() as stop:
            run_dir, created, lock = open_run(cfg, model_cfg, world)
            try:
                return run_training(model_cfg, cfg, torch.device(device), rank, world, run_dir, created, stop)
            finally:
                if lock is not None:
                    lock.release()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_training(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    device: torch.device,
    rank: int,
    world: int,
    run_dir: Path,
    created: bool,
    stop: StopRequest,
) -> Path:
    """`train` in its locked run directory: set-up (refused before anything is written), then the loop."""
    main = rank == 0
    with removed_on_refusal(run_dir, created and main):
        if cfg.resume:
            saved = read_run_config(run_dir)
            changed = [k for k, v in model_cfg.to_dict().items() if saved.get(k) != v]
            if changed:
                raise SSLensError(
                    f"--resume: {changed[0]} is {saved.get(changed[0])!r} in {run_dir}/config.yaml, not "
                    f"{getattr(model_cfg, changed[0])!r}; a run keeps its model"
                )
        tokens_per_micro = cfg.batch_size * model_cfg.n_ctx
        accum = max(1, cfg.total_batch_size // tokens_per_micro)
        if cfg.total_batch_size and cfg.total_batch_size != accum * tokens_per_micro:
            raise SSLensError(
                f"total_batch_size {cfg.total_batch_size} must be a multiple of batch_size x n_ctx = {tokens_per_micro}"
            )
        torch.manual_seed(cfg.seed)
        model = HookedLlama(model_cfg)
        model.init_weights(cfg.seed)
        schedule = checkpoint_steps(cfg.checkpoint_schedule, cfg.max_steps, cfg.checkpoint_every)
        _on_rank0(world, lambda: check_free_space(run_dir, model, len(schedule)))  # a refusal reaches every rank
        split = train_val(cfg.data, seed=cfg.seed)
        train_stories, val_stories = split.train, split.val

        def write_tokenizer_and_config() -> None:
            if cfg.resume:
                tok = load_tokenizer(run_dir / "tokenizer.json")
            elif cfg.tokenizer:
                tok = load_tokenizer(cfg.tokenizer)
            else:
                tok = train_tokenizer((b["story"] for b in train_stories.iter(batch_size=1000)), model_cfg.d_vocab)
            # refused before anything is written: a tokenizer larger than d_vocab, a context too short for the
            # samples' prompt, another split than the one resumed, a token stream shorter than one window
            model.tokenizer = tok
            check_sample_prompt(tok, model_cfg, cfg)
            record = check_split(run_dir, split, cfg)
            for stories, what in (
                (train_stories, "the training stories"),
                (val_stories, f"the validation stories ({record['validation']})"),
            ):
                Batches(tokenize(stories, tok), model_cfg.n_ctx, 1, what=what)  # and the token cache, for every rank
            save_tokenizer(tok, run_dir / "tokenizer.json")
            write_run_config(run_dir, model_cfg.to_dict() | cfg.to_dict() | {"resume": False})
            write_split(run_dir, record)

        _on_rank0(world, write_tokenizer_and_config)
        model.tokenizer = tok = load_tokenizer(run_dir / "tokenizer.json")
        batches = Batches(tokenize(train_stories, tok), model_cfg.n_ctx, cfg.batch_size * world, cfg.seed)
        rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)  # this rank's part of each global batch
        val = Batches(tokenize(val_stories, tok), model_cfg.n_ctx, cfg.batch_size, cfg.seed)
        model.to(device).train()
        optimizer = adamw(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        step = resume(run_dir, model, optimizer, batches) if cfg.resume else 0
    stop.in_loop = True  # from here a signal stops training after a step, with a checkpoint
    forward = TrainingLoss(model)
    forward = torch.compile(forward) if use_compile(cfg, device) else forward
    if world > 1:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast_dtype(cfg, device)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        keep_metrics_until(metrics_path, step)

    def checkpoint() -> None:
        if main:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "data_position": batches.position,
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(run_dir, step, model, state)
        _barrier(world)

    if step == 0 and 0 in schedule:
        checkpoint()
    wandb_run = start_wandb(run_dir, cfg, model_cfg) if cfg.wandb_project and main else None
    step_flops = flops_per_token(model_cfg) * accum * tokens_per_micro * world
    peak = peak_flops(str(device), amp or torch.float32) * world
    bar = tqdm(total=cfg.max_steps, initial=step, desc=run_dir.name, dynamic_ncols=True, disable=None if main else True)
    lagged = device.type in LAGGED_DEVICES
    pending: PendingStep | None = None
    print_every = cfg.print_every or max(1, cfg.max_steps // 20)  # the plain lines that stand in for a hidden bar
    started, first_step = time.perf_counter(), step

    def validates(s: int) -> bool:
        return s % cfg.val_every == 0 or s == cfg.max_steps

    def settle(p: PendingStep) -> None:
        """Read a step's loss and gradient norm (waiting for that step alone), stop if either is not finite, then
        validate, log and checkpoint as scheduled."""
        loss, grad_norm = p.loss.item(), p.grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # its update was skipped: weights stay finite
            kept = saved_steps(run_dir)
            raise SSLensError(
                f"the loss is {loss} and the gradient norm {grad_norm} at step {p.step}; "
                "training stopped. The newest good "
                + (f"checkpoint is step {kept[-1]}" if kept else "state is the initialisation (no checkpoint yet)")
                + ": lower --lr or check the data, then --resume"
            )
        seconds = p.began.seconds_to(p.ended)
        record = {
            "step": p.step,
            "tokens": p.step * accum * tokens_per_micro * world,
            "loss": round(loss, 6),
            "lr": p.lr,
            "grad_norm": round(grad_norm, 6),
            "tok_s": round(accum * tokens_per_micro * world / seconds),
            "mfu": round(step_flops / seconds / peak, 4),
        }
        if validates(p.step):
            record["val_loss"] = round(validation_loss(model, val, cfg.val_batches, device, amp), 6)
            if main and cfg.val_samples:  # seeded by the step: resume writes the same stories, global RNG untouched
                record["samples"] = [
                    SAMPLE_PROMPT + s.text
                    for s in model.generate(
                        SAMPLE_PROMPT, 48, temperature=0.8, top_k=40, seed=p.step, num_samples=cfg.val_samples
                    )
                ]
        if p.stop is not None and p.stop.item() > 0:  # some rank was signalled: all stop after the step in progress
            stop.agreed = True
        if p.step % cfg.log_every == 0 or "val_loss" in record or p.step in schedule:
            with writing(metrics_path):
                log.write(json.dumps(record) + "\n")
                log.flush()
            if wandb_run is not None:
                wandb_run.log(record, step=p.step)
        if p.step in schedule:
            checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{p.lr:.2e}", tok_s=record["tok_s"], mfu=f"{record['mfu']:.1%}")
        if main and bar.disable and (p.step % print_every == 0 or p.step == cfg.max_steps):
            print(
                progress_line(record, cfg.max_steps, p.step - first_step, time.perf_counter() - started),
                file=sys.stderr,
                flush=True,
            )

    with writing(metrics_path), open(metrics_path, "a") if main else open(os.devnull, "w") as log:
        while step < cfg.max_steps:
            began = Mark(device)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                windows = to_device(next(batches)[rows], device)
                x, y = windows[:, :-1], windows[:, 1:]
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = forward(x, y) / accum
                loss.backward()
                loss_sum += loss.detach()
            if pending is not None:  # the previous step, read while this one runs
                settle(pending)
            loss_sum, stop_flag = _mean_over_ranks(loss_sum, world, stop)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            skip_if_not_finite(optimizer, loss_sum, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending = PendingStep(step, lr, loss_sum, grad_norm, began, Mark(device), stop_flag)
            stopping = stop.stops_after_this_step(world)
            if stopping:
                schedule.add(step)
            if not lagged or validates(step) or step in schedule:  # these see this step's weights, nothing later
                settle(pending)
                pending = None
            if stopping:
                raise stop.interrupted(step)
    bar.close()
    if wandb_run is not None:
        wandb_run.finish()
    return run_dir


def progress_line(record: dict, max_steps: int, steps_done: int, seconds: float) -> str:
    """One plain line for a log that no progress bar reaches: step, losses, speed, time so far and to go."""
    eta = seconds / max(1, steps_done) * (max_steps - record["step"])
    val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
    return (
        f"step {record['step']}/{max_steps} loss {record['loss']:.4f}{val} tok/s {record['tok_s']:,} "
        f"elapsed {duration(seconds)} eta {duration(eta)}"
    )


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A batch copied to the device without waiting for the GPU: a plain copy from pageable memory waits for all
    queued work, which would stall the GPU between steps however late the loop reads their numbers."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _mean_over_ranks(value: Tensor, world: int, stop: StopRequest) -> tuple[Tensor, Tensor | None]:
    """The value's mean over ranks and, in the same reduction, how many ranks were asked to stop (None for a lone
    process, which reads its own request)."""
    if world == 1:
        return value, None
    both = torch.stack([value, stop.flag(value.device)])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return both[0] / world, both[1]


def start_wandb(run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig):
    """A W&B run that a resumed training continues (its id is kept in the run directory)."""
    import wandb

    env = Path(".env")
    if "WANDB_API_KEY" not in os.environ and env.is_file():
        for line in env.read_text().splitlines():
            key, _, value = line.strip().partition("=")
            if key == "WANDB_API_KEY":
                os.environ["WANDB_API_KEY"] = value.strip().strip("'\"")
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        atomic_write_text(id_file, secrets.token_hex(4))
    return wandb.init(
        project=cfg.wandb_project,
        name=run_dir.name,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(run_dir),
        config=model_cfg.to_dict() | cfg.to_dict(),
    )


@torch.no_grad()
def validation_loss(
    model: HookedLlama, val: Batches, n_batches: int, device: torch.device, amp: torch.dtype | None
) -> float:
    """Mean loss over the first n_batches windows of the held-out stream (always the same windows)."""
    model.eval()
    windows = min(val.n_windows, n_batches * val.batch_size)
    losses = []
    for start in range(0, windows, val.batch_size):
        rows = val.windows(range(start, min(windows, start + val.batch_size))).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(rows[:, :-1])
        losses.append(next_token_loss(logits, rows[:, 1:], reduction="sum").item())
    model.train()
    return sum(losses) / (windows * val.n_ctx)


def resume(run_dir: Path, model: HookedLlama, optimizer: torch.optim.Optimizer, batches: Batches) -> int:
    """Restore the newest checkpoint that reads back; returns its step. A newer one that does not (truncated or
    corrupted after it was written) is skipped with a warning, and rewritten when training passes its step again."""
    for step in reversed(saved_steps(run_dir)):
        try:
            weights, state = load_run_model(run_dir, step).state_dict(), load_trainer_state(run_dir, step)
        except SSLensError as e:
            print(f"sslens: warning: {e}; resuming from an earlier checkpoint", file=sys.stderr)
            continue
        model.load_state_dict(weights)
        load_optimizer_state(optimizer, state["optimizer"])
        batches.position = state["data_position"]
        torch.set_rng_state(state["torch_rng"])
        return step
    raise SSLensError(f"--resume: no checkpoint in {run_dir} reads back; start a new run")


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metrics lines after `step` (written by a run that died before its next checkpoint), and any line
    that is not a whole record (cut short by a full disk or a kill), with a warning."""
    if path.exists():
        records, bad = read_metrics(path)
        if bad:
            print(
                f"sslens: warning: {path}: dropped line {', '.join(map(str, bad))}, not a complete record "
                "(a write cut short)",
                file=sys.stderr,
            )
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


def check_sample_prompt(tok, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Validation samples continue SAMPLE_PROMPT: refuse, at start, a context too short to hold it and one token."""
    length = len(encode(tok, SAMPLE_PROMPT, eos=False))
    if cfg.val_samples and length >= model_cfg.n_ctx:
        raise SSLensError(
            f"n_ctx {model_cfg.n_ctx} leaves no room to continue the validation samples' prompt "
            f"{SAMPLE_PROMPT!r} ({length} tokens); raise n_ctx above {length} or set --val_samples=0"
        )


def check_split(run_dir: Path, split: Split, cfg: TrainConfig) -> dict:
    """The record of this run's training/validation split; on --resume, refused unless it is the recorded one
    (the data changed, or another seed would hold out other stories)."""
    record = split.record(cfg.data, cfg.seed)
    saved = read_split(run_dir) if cfg.resume else None
    keys = ("validation", "train_fingerprint", "val_fingerprint")
    if saved is not None and any(saved.get(k) != record[k] for k in keys):
        raise SSLensError(
            f"--resume: the training or validation stories differ from those in {run_dir}/split.json "
            "(the data or the seed changed); resume with the run's own data and seed"
        )
    return record
