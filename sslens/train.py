"""`sslens train`: the training loop, leaving behind many checkpoints for studying training dynamics.

`train` is the loop, whole on one screen: batch, forward and loss, backward, clip, step, record. What a run has
is set up once (`set_up` returns a `Run`); what each step leaves behind (metrics, validation, samples, checkpoints,
the progress display) is the `Recorder`'s, a method per event. Resume is exact: weights, optimizer, data
position and RNG come back from the newest complete checkpoint, and metrics.jsonl loses the lines after it.

A step whose loss or gradient norm is not finite is skipped on the device (its update never touches the weights)
and stops training when its numbers are read. On a GPU they are read while the next step runs, so the GPU never
waits for Python between steps; validation and checkpoints still see exactly their step's weights.
"""

from __future__ import annotations

import contextlib
import functools
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

import tokenizers
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import (
    checkpoint_steps,
    drop_old_trainer_states,
    load_model,
    load_run_model,
    load_trainer_state,
    read_metrics,
    read_run_config,
    read_split,
    resumable_steps,
    save_checkpoint,
    saved_steps,
    write_run_config,
    write_split,
)
from .config import ModelConfig, TrainConfig
from .data import Batches, Split, tokenize, train_val
from .distributed import barrier, distributed, leave, mean_over_ranks, on_rank0
from .errors import Interrupted, SSLensError
from .fileio import atomic_write_text, writing
from .flops import flops_per_token, peak_flops
from .model import HookedLlama
from .runlock import RunLock
from .tokenizer import encode, load_tokenizer, save_tokenizer, train_tokenizer

SAMPLE_PROMPT = "Once upon a time"  # validation samples continue it: a story opening every corpus knows
VAL_SAMPLE_TOKENS = 48  # about two sentences: enough to read whether the model writes sentences yet
VAL_SAMPLE_TEMPERATURE, VAL_SAMPLE_TOP_K = 0.8, 40  # mildly sharpened sampling, as sample stories are usually shown
COMPILE_AUTO_MIN_STEPS = 200  # --compile=auto: enough steps to repay compiling (see `use_compile`)
WEIGHT_BYTES, TRAINER_STATE_BYTES = 4, 8  # per parameter: fp32 weights; AdamW's two fp32 moments
RUN_FILES_ROOM = 64 << 20  # metrics, tokenizer, token caches' growth and a checkpoint being written
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
    return cfg.max_steps >= COMPILE_AUTO_MIN_STEPS and (device.type == "cuda" or shutil.which("g++") is not None)


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
        if cfg.resume and not resumable_steps(run_dir):
            kept = " with a trainer state (trainer.pt)" if saved_steps(run_dir) else ""
            raise SSLensError(f"--resume: {run_dir} has no complete checkpoint{kept} to resume from")
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

    run_dir, created = on_rank0(world, prepare)
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


def check_free_space(run_dir: Path, model: HookedLlama, n_checkpoints: int, keep_trainer_states: int) -> None:
    """Refuse to start a run whose checkpoints cannot fit: each holds fp32 weights, and the newest
    `keep_trainer_states` also AdamW's two moments (one more while a new checkpoint is written)."""
    n_params = sum(p.numel() for p in model.parameters())
    states = min(n_checkpoints, keep_trainer_states + 1)
    need = (n_checkpoints * WEIGHT_BYTES + states * TRAINER_STATE_BYTES) * n_params + RUN_FILES_ROOM
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise SSLensError(
            f"{run_dir} has {free / 2**30:.2f} GiB free but {n_checkpoints} checkpoints of this model need "
            f"about {need / 2**30:.2f} GiB; free space, choose another --out_dir or fewer checkpoints "
            f"(--checkpoint_schedule)"
        )


def train(model_cfg: ModelConfig, cfg: TrainConfig, device: str | None = None) -> Path:
    """Train, checkpointing on the schedule, and return the run directory. Under torchrun every rank takes its
    slice of each global batch (batch_size per rank); rank 0 alone writes the tokenizer, checkpoints and logs, and
    holds the run directory's lock. SIGINT or SIGTERM stops after the current step with a checkpoint of it
    (`StopRequest`), raising `Interrupted`."""
    with opened(model_cfg, cfg, device) as (run, stop), Recorder(run, stop) as record:
        forward = training_forward(run)
        while run.step < cfg.max_steps:
            began = Mark(run.device)
            lr = lr_at(run.step, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss = torch.zeros((), device=run.device)
            for x, y in run.micro_batches():
                with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
                    micro_loss = forward(x, y) / run.accum
                micro_loss.backward()
                loss += micro_loss.detach()
            record.previous_step()  # read while this step's work runs (on a GPU)
            loss, stop_flag = mean_over_ranks(loss, run.world, stop.flag)
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or float("inf"))
            skip_if_not_finite(run.optimizer, loss, grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            stopping = stop.stops_after_this_step(run.world)
            record.step(PendingStep(run.step, lr, loss, grad_norm, began, Mark(run.device), stop_flag), stopping)
            if stopping:
                raise stop.interrupted(run.step)
        record.finish()
    return run.run_dir


@dataclass
class Run:
    """What a run has once it is set up: where it runs, its directory, model, data, optimizer and step."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    device: torch.device
    rank: int
    world: int
    run_dir: Path
    model: HookedLlama
    batches: Batches  # global batches; `rows` is this rank's part of each
    rows: slice
    val: Batches
    optimizer: torch.optim.Optimizer
    schedule: set[int]  # the checkpoint steps
    step: int
    accum: int  # micro-batches per step (gradient accumulation)
    amp: torch.dtype | None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.accum * self.cfg.batch_size * self.model_cfg.n_ctx * self.world

    def micro_batches(self) -> Iterator[tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]:
        """This rank's inputs and next-token targets for each micro-batch of the next step."""
        for _ in range(self.accum):
            windows = to_device(next(self.batches)[self.rows], self.device)
            yield windows[:, :-1], windows[:, 1:]

    def validates(self, step: int) -> bool:
        return step % self.cfg.val_every == 0 or step == self.cfg.max_steps


@contextlib.contextmanager
def opened(model_cfg: ModelConfig, cfg: TrainConfig, device: str | None) -> Iterator[tuple[Run, StopRequest]]:
    """A set-up run and the signal handling around it: joins torchrun's process group (and leaves it), locks the
    run directory (and releases it)."""
    rank, world = distributed()
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        with StopRequest() as stop:
            run_dir, created, lock = open_run(cfg, model_cfg, world)
            try:
                run = set_up(model_cfg, cfg, torch.device(device), rank, world, run_dir, created)
                stop.in_loop = True  # from here a signal stops training after a step, with a checkpoint
                yield run, stop
            finally:
                if lock is not None:
                    lock.release()
    finally:
        leave(world)


def set_up(
    model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, rank: int, world: int, run_dir: Path, created: bool
) -> Run:
    """Everything the loop needs, refused before anything is written (a directory this run created is removed)."""
    with removed_on_refusal(run_dir, created and rank == 0):
        if cfg.resume:
            check_same_model(run_dir, model_cfg)
        accum = accumulation(cfg, model_cfg)
        torch.manual_seed(cfg.seed)
        model, source_tokenizer = initial_model(model_cfg, cfg)
        schedule = checkpoint_steps(cfg.checkpoint_schedule, cfg.max_steps, cfg.checkpoint_every)
        room = functools.partial(check_free_space, run_dir, model, len(schedule), cfg.keep_trainer_states)
        on_rank0(world, room)  # a refusal reaches every rank
        split = train_val(cfg.data, seed=cfg.seed)
        on_rank0(world, lambda: write_tokenizer_and_config(run_dir, split, model, cfg, source_tokenizer))
        model.tokenizer = tok = load_tokenizer(run_dir / "tokenizer.json")
        batches = Batches(tokenize(split.train, tok), model_cfg.n_ctx, cfg.batch_size * world, cfg.seed)
        val = Batches(tokenize(split.val, tok), model_cfg.n_ctx, cfg.batch_size, cfg.seed)
        model.to(device).train()
        optimizer = adamw(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        step = resume(run_dir, model, optimizer, batches) if cfg.resume else 0
    rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)  # this rank's part of each global batch
    amp = autocast_dtype(cfg, device)
    return Run(cfg, model_cfg, device, rank, world, run_dir, model, batches, rows, val, optimizer, schedule, step,
               accum, amp)  # fmt: skip


def check_same_model(run_dir: Path, model_cfg: ModelConfig) -> None:
    saved = read_run_config(run_dir)
    changed = [k for k, v in model_cfg.to_dict().items() if saved.get(k) != v]
    if changed:
        raise SSLensError(
            f"--resume: {changed[0]} is {saved.get(changed[0])!r} in {run_dir}/config.yaml, not "
            f"{getattr(model_cfg, changed[0])!r}; a run keeps its model"
        )


def accumulation(cfg: TrainConfig, model_cfg: ModelConfig) -> int:
    """Micro-batches per optimizer step: total_batch_size in tokens over one micro-batch's tokens (1 if unset)."""
    tokens_per_micro = cfg.batch_size * model_cfg.n_ctx
    accum = max(1, cfg.total_batch_size // tokens_per_micro)
    if cfg.total_batch_size and cfg.total_batch_size != accum * tokens_per_micro:
        raise SSLensError(
            f"total_batch_size {cfg.total_batch_size} must be a multiple of batch_size x n_ctx = {tokens_per_micro}"
        )
    return accum


def initial_model(model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[HookedLlama, tokenizers.Tokenizer | None]:
    """The model at step 0, freshly initialised, or a copy of `cfg.init_from`'s weights (its tokenizer with it)."""
    model = HookedLlama(model_cfg)
    if not cfg.init_from:
        model.init_weights(cfg.seed)
        return model, None
    source = fine_tuning_source(cfg)
    ours, theirs = model_cfg.to_dict(), source.cfg.to_dict()
    for key in ours.keys() - {"model_name", "initializer_range", "n_ctx"}:
        if ours[key] != theirs[key]:
            raise SSLensError(
                f"--init_from: {key} is {theirs[key]!r} in {cfg.init_from}, not {ours[key]!r}; a fine-tuned model keeps "
                "its source's shape (only n_ctx may shrink)"
            )
    if model_cfg.n_ctx > source.cfg.n_ctx:
        raise SSLensError(f"--init_from: n_ctx {model_cfg.n_ctx} exceeds {cfg.init_from}'s {source.cfg.n_ctx}")
    model.load_state_dict(source.state_dict())
    return model, source.tokenizer


def fine_tuning_source(cfg: TrainConfig) -> HookedLlama:
    source = load_model(cfg.init_from, None if cfg.init_step == -1 else cfg.init_step)
    if source.tokenizer is None:
        raise SSLensError(
            f"--init_from: {cfg.init_from} has no tokenizer.json, and a fine-tuned run keeps its source's"
        )
    return source


def fine_tuning_config(cfg: TrainConfig, **overrides) -> ModelConfig:
    """The model config of a run that fine-tunes `cfg.init_from`: the source's, with `overrides` of its keys
    (`initial_model` refuses those that would change its shape)."""
    return ModelConfig.from_dict(fine_tuning_source(cfg).cfg.to_dict() | overrides)


def write_tokenizer_and_config(
    run_dir: Path, split: Split, model: HookedLlama, cfg: TrainConfig, given: tokenizers.Tokenizer | None = None
) -> None:
    """The run's tokenizer (resumed, `given` by the fine-tuning source, read from cfg.tokenizer, or trained on the
    training stories), config.yaml and split.json. First
    refuses what would fail later: a tokenizer larger than d_vocab, a context too short for the samples' prompt,
    another split than the one resumed, a token stream shorter than one window."""
    model_cfg = model.cfg
    if cfg.resume:
        tok = load_tokenizer(run_dir / "tokenizer.json")
    elif given is not None:
        tok = given
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        tok = train_tokenizer(split.train["story"], model_cfg.d_vocab)
    model.tokenizer = tok  # refuses one larger than d_vocab
    check_sample_prompt(tok, model_cfg, cfg)
    record = check_split(run_dir, split, cfg)
    for stories, what in (
        (split.train, "the training stories"),
        (split.val, f"the validation stories ({record['validation']})"),
    ):
        Batches(tokenize(stories, tok), model_cfg.n_ctx, 1, what=what)  # and the token cache, for every rank
    save_tokenizer(tok, run_dir / "tokenizer.json")
    write_run_config(run_dir, model_cfg.to_dict() | cfg.to_dict() | {"resume": False})
    write_split(run_dir, record)


def training_forward(run: Run) -> nn.Module:
    """The loss as the loop calls it: compiled where that pays, wrapped for DDP under torchrun."""
    forward = TrainingLoss(run.model)
    forward = torch.compile(forward) if use_compile(run.cfg, run.device) else forward
    if run.world > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        forward = DistributedDataParallel(forward, device_ids=device_ids)
    return forward


class Recorder:
    """What each step leaves behind, one method per event: its numbers read from the device (on a GPU during the
    next step), checked, validated, logged (metrics.jsonl, W&B, the progress bar or plain lines) and checkpointed."""

    def __init__(self, run: Run, stop: StopRequest):
        self.run, self.stop = run, stop
        self.metrics = run.run_dir / "metrics.jsonl"
        self.lagged = run.device.type in LAGGED_DEVICES
        self.pending: PendingStep | None = None
        self.step_flops = flops_per_token(run.model_cfg) * run.tokens_per_step
        self.peak = peak_flops(str(run.device), run.amp or torch.float32) * run.world
        self.print_every = run.cfg.print_every or max(1, run.cfg.max_steps // 20)  # lines that stand in for the bar
        self.files = contextlib.ExitStack()

    def __enter__(self) -> Recorder:
        run = self.run
        if run.main:
            keep_metrics_until(self.metrics, run.step)
        if run.step == 0 and 0 in run.schedule:
            self.checkpoint(0)
        self.wandb = start_wandb(run.run_dir, run.cfg, run.model_cfg) if run.cfg.wandb_project and run.main else None
        self.files.enter_context(writing(self.metrics))  # a full disk when the log is closed names it too
        self.log = self.files.enter_context(open(self.metrics, "a") if run.main else open(os.devnull, "w"))
        self.bar = tqdm(total=run.cfg.max_steps, initial=run.step, desc=run.run_dir.name, dynamic_ncols=True,
                        disable=None if run.main else True)  # fmt: skip
        self.started, self.first_step = time.perf_counter(), run.step
        return self

    def __exit__(self, *exc) -> bool | None:
        return self.files.__exit__(*exc)

    def previous_step(self) -> None:
        """Settle the step left pending (lagged devices), now that the next one is queued."""
        if self.pending is not None:
            self.settle(self.pending)
            self.pending = None

    def step(self, p: PendingStep, stopping: bool) -> None:
        """A step just taken: settled at once, or on a lagged device left pending unless it validates or
        checkpoints (which must see this step's weights, nothing later). A stopping step is checkpointed."""
        if stopping:
            self.run.schedule.add(p.step)
        if not self.lagged or self.run.validates(p.step) or p.step in self.run.schedule:
            self.settle(p)
        else:
            self.pending = p

    def settle(self, p: PendingStep) -> None:
        """Read a step's numbers (waiting for that step alone), then validate, log and checkpoint as scheduled."""
        record = self.read(p)
        if self.run.validates(p.step):
            record |= self.validate(p.step)
        if p.stop is not None and p.stop.item() > 0:  # some rank was signalled: all stop after the step in progress
            self.stop.agreed = True
        if p.step % self.run.cfg.log_every == 0 or "val_loss" in record or p.step in self.run.schedule:
            with writing(self.metrics):
                self.log.write(json.dumps(record) + "\n")
                self.log.flush()
            if self.wandb is not None:
                self.wandb.log(record, step=p.step)
        if p.step in self.run.schedule:
            self.checkpoint(p.step)
        self.show(record)

    def read(self, p: PendingStep) -> dict:
        """The step's metrics record; a loss or gradient norm that is not finite stops training (the step's update
        was skipped on the device, so the weights stay finite)."""
        loss, grad_norm = p.loss.item(), p.grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = saved_steps(self.run.run_dir)
            raise SSLensError(
                f"the loss is {loss} and the gradient norm {grad_norm} at step {p.step}; "
                "training stopped. The newest good "
                + (f"checkpoint is step {kept[-1]}" if kept else "state is the initialisation (no checkpoint yet)")
                + ": lower --lr or check the data, then --resume"
            )
        seconds = p.began.seconds_to(p.ended)
        return {
            "step": p.step,
            "tokens": p.step * self.run.tokens_per_step,
            "loss": round(loss, 6),
            "lr": p.lr,
            "grad_norm": round(grad_norm, 6),
            "tok_s": round(self.run.tokens_per_step / seconds),
            "mfu": round(self.step_flops / seconds / self.peak, 4),
        }

    def validate(self, step: int) -> dict:
        """Held-out loss and, on rank 0, sample stories (seeded by the step: a resumed run writes the same ones,
        and the global RNG is untouched)."""
        run = self.run
        result = {"val_loss": round(validation_loss(run.model, run.val, run.cfg.val_batches, run.device, run.amp), 6)}
        if run.main and run.cfg.val_samples:
            samples = run.model.generate(
                SAMPLE_PROMPT, VAL_SAMPLE_TOKENS, temperature=VAL_SAMPLE_TEMPERATURE, top_k=VAL_SAMPLE_TOP_K,
                seed=step, num_samples=run.cfg.val_samples,
            )  # fmt: skip
            result["samples"] = [SAMPLE_PROMPT + s.text for s in samples]
        return result

    def checkpoint(self, step: int) -> None:
        run = self.run
        if run.main:
            state = {
                "step": step,
                "optimizer": run.optimizer.state_dict(),
                "data_position": run.batches.position,
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(run.run_dir, step, run.model, state)
            drop_old_trainer_states(run.run_dir, run.cfg.keep_trainer_states)
        barrier(run.world)

    def show(self, record: dict) -> None:
        """The progress bar, or where no terminal shows it, a plain line every `print_every` steps."""
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=record["tok_s"], mfu=f"{record['mfu']:.1%}"
        )
        step, max_steps = record["step"], self.run.cfg.max_steps
        if self.run.main and self.bar.disable and (step % self.print_every == 0 or step == max_steps):
            seconds = time.perf_counter() - self.started
            print(progress_line(record, max_steps, step - self.first_step, seconds), file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


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
    for step in reversed(resumable_steps(run_dir)):  # older checkpoints keep their weights alone
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
