import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sslens import SSLensError, load_model
from sslens.checkpoint import checkpoint_dir, checkpoint_steps, saved_steps
from sslens.config import load_train_config
from sslens.train import lr_at, train

from conftest import assert_column_major, free_port

TINY = [
    "--n_layers=2",
    "--d_model=64",
    "--n_heads=4",
    "--d_mlp=170",
    "--n_ctx=32",
    "--batch_size=4",
    "--warmup_steps=3",
    "--val_every=10",
    "--log_every=1",
    "--data=synth:400",
    "--dtype=float32",
]


def tiny(tmp_path, *extra, name="run"):
    from sslens.config import parse_overrides

    return load_train_config("1.25M", **parse_overrides([*TINY, f"--out_dir={tmp_path / name}", *extra]))


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def write_tokenizer(tmp_path) -> None:
    """tmp_path/tok.json, for runs that must see the same tokens: `tokenizers` trains with process-seeded hash maps,
    so two trainings of the same data can tie-break merges differently."""
    from sslens.data import load_stories
    from sslens.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(list(load_stories("synth:400")["story"]), 4096), tmp_path / "tok.json")


def torchrun_train(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=2 -m sslens train 1.25M ARGS` on CPU, one thread per process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "sslens",
            "train",
            "1.25M",
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=timeout,
    )


def test_checkpoint_schedules():
    assert checkpoint_steps("log", 3000, 1000) == {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1000, 2000, 3000}
    assert checkpoint_steps("log", 20, 1000) == {0, 1, 2, 4, 8, 16, 20}
    assert checkpoint_steps("linear", 250, 100) == {0, 100, 200, 250}
    assert checkpoint_steps("0,5, 7", 10, 100) == {0, 5, 7, 10}
    with pytest.raises(SSLensError, match="checkpoint_schedule"):
        checkpoint_steps("often", 10, 100)


def test_lr_schedule_warmup_then_cosine():
    _, cfg = load_train_config("1.25M", lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3) and lr_at(110, cfg) == pytest.approx(1e-4)


def test_run_directory_and_loading(tmp_path):
    run = train(*tiny(tmp_path, "--max_steps=12"))
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "tokenizer.json",
        "split.json",
        "metrics.jsonl",
        "checkpoints",
    }
    assert saved_steps(run) == [0, 1, 2, 4, 8, 12]
    assert all((run / "checkpoints" / f"step_{s:07d}" / "model.safetensors").is_file() for s in saved_steps(run))
    kept = [s for s in saved_steps(run) if (run / "checkpoints" / f"step_{s:07d}" / "trainer.pt").is_file()]
    assert kept == [8, 12]  # the newest keep_trainer_states (2) hold the optimizer state (changed in issue 19)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows[-1]["tokens"] == 12 * 4 * 32
    assert {"loss", "lr", "grad_norm", "tok_s"} <= set(rows[0]) and "val_loss" in rows[9] and "val_loss" in rows[-1]
    assert [len(r["samples"]) for r in rows if "samples" in r] == [2, 2] and "samples" in rows[9]
    assert all(s.startswith("Once upon a time") and len(s) > len("Once upon a time") for s in rows[9]["samples"])
    assert rows[-1]["loss"] < rows[0]["loss"]
    newest, at4 = load_model(run), load_model(run, step=4)
    weights12 = load_file(run / "checkpoints" / "step_0000012" / "model.safetensors")
    assert all(torch.equal(v, weights12[k]) for k, v in newest.state_dict().items())
    assert not torch.equal(newest.W_E, at4.W_E)
    assert torch.equal(load_model(run / "checkpoints" / "step_0000004").W_E, at4.W_E)
    assert newest.tokenizer is not None and newest.cfg.n_layers == 2
    assert_column_major(newest)
    with pytest.raises(SSLensError, match="no checkpoint at step 3"):
        load_model(run, step=3)


def test_refusals(tmp_path):
    train(*tiny(tmp_path, "--max_steps=2"))
    with pytest.raises(SSLensError, match="already holds a run"):
        train(*tiny(tmp_path, "--max_steps=2"))
    with pytest.raises(SSLensError, match="no complete checkpoint"):
        train(*tiny(tmp_path, "--max_steps=2", "--resume", name="empty"))
    with pytest.raises(SSLensError, match="--resume: n_layers is 2 in .*config.yaml, not 3; a run keeps its model"):
        train(*tiny(tmp_path, "--max_steps=4", "--resume", "--n_layers=3"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SSLensError, match="is a file"):
        train(*tiny(tmp_path, "--max_steps=2", name="file"))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """batch_size 2 with total_batch_size of 4 sequences (two micro-batches per step) follows batch_size 4."""
    write_tokenizer(tmp_path)
    tok = f"--tokenizer={tmp_path / 'tok.json'}"
    big = train(*tiny(tmp_path, "--max_steps=6", "--batch_size=4", tok, name="big"))
    accumulated = train(*tiny(tmp_path, "--max_steps=6", "--batch_size=2", "--total_batch_size=128", tok, name="accum"))
    assert [m["tokens"] for m in metrics(accumulated)] == [m["tokens"] for m in metrics(big)]
    assert [m["loss"] for m in metrics(accumulated)] == pytest.approx([m["loss"] for m in metrics(big)], abs=1e-5)
    a, b = load_model(accumulated), load_model(big)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_weight_decay_on_two_dimensional_weights_only():
    from sslens import HookedLlama
    from sslens.train import adamw

    model = HookedLlama.from_preset("1.25M", n_layers=2)
    decay, no_decay = adamw(model, 1e-3, (0.9, 0.95), 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.95)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(n for n in names.values() if n.endswith(".w"))
    assert len(decay["params"]) + len(no_decay["params"]) == len(names) and decay["fused"]


def test_train_help_lists_every_key_with_its_default():
    from sslens.config import ModelConfig, TrainConfig, settable_fields

    out = subprocess.run(
        [sys.executable, "-m", "sslens", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "400"},
    ).stdout
    for f in settable_fields(TrainConfig):
        assert re.search(rf"^  {f.name} +\S.* \[{re.escape(repr(f.default))}\]$", out, re.M), f.name
    model_keys = out.split("model keys")[1]
    assert all(f.name in model_keys for f in settable_fields(ModelConfig))


@pytest.mark.parametrize("lagged", [False, True], ids=["read at once", "read during the next step"])
@pytest.mark.parametrize("fault", ["nan loss", "inf gradient, finite loss"])
def test_an_injected_non_finite_step_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, fault, lagged
):
    """The 6th training loss is NaN, or finite with an infinite gradient (sqrt at 0): training stops at step 6,
    naming it, and the optimizer never writes non-finite weights; checkpoints 0, 1, 2, 4 remain and are finite.
    Also when, as on a GPU, each step's numbers are read during the next step (the update is skipped on the device)."""
    import sslens.train

    monkeypatch.setattr(sslens.train, "LAGGED_DEVICES", ("cpu",) if lagged else ())

    cross_entropy, calls = sslens.train.F.cross_entropy, []

    def faulty(logits, targets, *args, **kwargs):
        calls.append(1)
        loss = cross_entropy(logits, targets, *args, **kwargs)
        if len(calls) != 6:
            return loss
        return loss * float("nan") if fault == "nan loss" else loss + torch.sqrt(logits.sum() - logits.sum().detach())

    monkeypatch.setattr(sslens.train.F, "cross_entropy", faulty)
    with pytest.raises(
        SSLensError, match=r"the loss is .* at step 6; training stopped. The newest good checkpoint is step 4"
    ):
        train(*tiny(tmp_path, "--max_steps=30"))
    assert saved_steps(tmp_path / "run") == [0, 1, 2, 4]
    assert all(torch.isfinite(p).all() for s in (0, 1, 2, 4) for p in load_model(tmp_path / "run", step=s).parameters())
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_reading_each_step_during_the_next_trains_and_logs_as_reading_it_at_once(tmp_path, monkeypatch):
    """The GPU's way (a step's loss and gradient norm read while the next step runs), forced on CPU: the same
    metrics, checkpoints and weights as reading each step at once (one tokenizer file for both)."""
    import sslens.train

    write_tokenizer(tmp_path)
    runs = {}
    for lagged in (False, True):
        monkeypatch.setattr(sslens.train, "LAGGED_DEVICES", ("cpu",) if lagged else ())
        runs[lagged] = train(
            *tiny(tmp_path, "--max_steps=12", f"--tokenizer={tmp_path / 'tok.json'}", name=f"lagged{lagged}")
        )
    keys = ("step", "tokens", "loss", "lr", "grad_norm", "val_loss")
    assert [[m.get(k) for k in keys] for m in metrics(runs[True])] == [
        [m.get(k) for k in keys] for m in metrics(runs[False])
    ]
    assert len(metrics(runs[True])) == 12 and metrics(runs[True])[9]["val_loss"] > 0
    assert saved_steps(runs[True]) == saved_steps(runs[False])
    for step in saved_steps(runs[True]):
        a, b = load_model(runs[True], step=step), load_model(runs[False], step=step)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), step


def test_a_checkpoint_of_a_foreach_optimizer_resumes_fused(tmp_path):
    """Earlier sslens saved AdamW as foreach on CPU: resuming from such a checkpoint runs fused (which can skip a
    non-finite step on the device) and ends where an uninterrupted run does."""
    write_tokenizer(tmp_path)
    tok = f"--tokenizer={tmp_path / 'tok.json'}"
    reference = train(*tiny(tmp_path, "--max_steps=6", tok, name="reference"))
    run = train(*tiny(tmp_path, "--max_steps=4", tok))
    path = checkpoint_dir(run, 4) / "trainer.pt"
    state = torch.load(path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=False, foreach=True)
    torch.save(state, path)
    train(*tiny(tmp_path, "--max_steps=6", tok, "--resume"))
    final, expected = load_model(run), load_model(reference)
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(final.state_dict().values(), expected.state_dict().values())
    )
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real process killed mid-run, resumed: bitwise the same final weights, and no step lost or doubled."""
    write_tokenizer(tmp_path)
    args = [*TINY, "--max_steps=40", f"--tokenizer={tmp_path / 'tok.json'}"]
    reference = train(*tiny(tmp_path, *args[len(TINY) :], name="reference"))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sslens.cli", "train", "1.25M", *args, f"--out_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while 8 not in saved_steps(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = saved_steps(run)[-1]
    assert 8 <= killed_at < 40, "the run finished before it could be killed"
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    final, expected = load_model(run), load_model(reference)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), expected.state_dict().values()))
    assert [m["step"] for m in metrics(run)] == list(range(1, 41))
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(reference)]
    assert [m.get("samples") for m in metrics(run)] == [m.get("samples") for m in metrics(reference)]


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_only_complete_checkpoints(tmp_path):
    """Kills at seeded random moments after a random checkpoint, with one every other step so a kill can land
    mid-write: every checkpoint directory left is complete and loads, and each resumed run ends bitwise equal to an
    uninterrupted one."""
    import random

    write_tokenizer(tmp_path)
    args = [
        *TINY,
        "--max_steps=30",
        "--checkpoint_schedule=linear",
        "--checkpoint_every=2",
        "--log_every=1",
        f"--tokenizer={tmp_path / 'tok.json'}",
    ]
    reference = load_model(train(*tiny(tmp_path, *args[len(TINY) :], name="reference")))
    for seed in range(3):
        run = tmp_path / f"killed{seed}"
        cmd = [sys.executable, "-m", "sslens.cli", "train", "1.25M", *args, f"--out_dir={run}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        rng = random.Random(seed)
        after = rng.randrange(0, 24, 2)  # a checkpoint step, then a random delay: mid-step or mid-write
        while after not in saved_steps(run) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert saved_steps(run)[-1] < 30, "the run finished before it was killed"
        states = 0
        for step_dir in (run / "checkpoints").iterdir():  # weights in all; trainer.pt in the newest 2 (3 while the
            if not step_dir.name.startswith(".tmp-"):  # kill fell between a save and dropping the oldest state)
                files = {p.name for p in step_dir.iterdir()}
                assert files in ({"model.safetensors"}, {"model.safetensors", "trainer.pt"}), files
                states += "trainer.pt" in files
        assert (checkpoint_dir(run, saved_steps(run)[-1]) / "trainer.pt").is_file() and states <= 3
        for step in saved_steps(run):
            load_model(run, step=step)
        r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        final = load_model(run)
        assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), reference.state_dict().values()))
        assert [m["step"] for m in metrics(run)] == list(range(1, 31))


@pytest.mark.slow
@pytest.mark.parametrize("nth_write", [3, 6])
def test_sigkill_inside_a_checkpoint_write(tmp_path, nth_write):
    """The process kills itself inside its nth checkpoint write (weights written, trainer state not): that step is
    a `.tmp-` directory only, never a checkpoint; resume continues from the one before and ends bitwise equal."""
    write_tokenizer(tmp_path)
    args = [*TINY, "--max_steps=12", f"--tokenizer={tmp_path / 'tok.json'}"]
    reference = load_model(train(*tiny(tmp_path, *args[len(TINY) :], name="reference")))
    run = tmp_path / "killed"
    dying_save = (
        "import os, signal, sys, torch\nfrom sslens.cli import main\nsave, calls = torch.save, []\n"
        "def save_or_die(obj, f):\n    calls.append(f)\n"
        f"    if len(calls) == {nth_write}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    save(obj, f)\ntorch.save = save_or_die\nmain(sys.argv[1:])\n"
    )
    cmd = ["train", "1.25M", *args, f"--out_dir={run}"]
    killed = subprocess.run([sys.executable, "-c", dying_save, *cmd], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    partial = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(partial) == 1 and {p.name for p in partial[0].iterdir()} == {"model.safetensors"}
    assert saved_steps(run) == [0, 1, 2, 4, 8][: nth_write - 1]
    r = subprocess.run([sys.executable, "-m", "sslens", *cmd, "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert saved_steps(run) == [0, 1, 2, 4, 8, 12] and not list((run / "checkpoints").glob(".tmp-*"))
    final = load_model(run)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), reference.state_dict().values()))
    assert [m["step"] for m in metrics(run)] == list(range(1, 13))


def test_a_corrupted_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys):
    write_tokenizer(tmp_path)
    tok = f"--tokenizer={tmp_path / 'tok.json'}"
    reference = train(*tiny(tmp_path, "--max_steps=16", tok, name="reference"))
    run = tmp_path / "broken"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / "step_0000016" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated after it was written
    with pytest.raises(SSLensError, match=r"step_0000016/model.safetensors is unreadable"):
        load_model(run)
    capsys.readouterr()
    train(*tiny(tmp_path, "--max_steps=16", "--resume", tok, name="broken"))  # falls back to step 8
    assert "step_0000016/model.safetensors is unreadable" in capsys.readouterr().err
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_model(run).state_dict().values(), load_model(reference).state_dict().values())
    )
    assert [m["step"] for m in metrics(run)] == list(range(1, 17))
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(reference)]


def test_compiled_training_follows_eager_training(tmp_path):
    from sslens.train import use_compile

    write_tokenizer(tmp_path)
    tok = f"--tokenizer={tmp_path / 'tok.json'}"
    eager = metrics(train(*tiny(tmp_path, "--max_steps=4", "--compile=False", tok, name="eager")))
    compiled = metrics(train(*tiny(tmp_path, "--max_steps=4", "--compile", tok, name="compiled")))
    assert [m["loss"] for m in compiled] == pytest.approx([m["loss"] for m in eager], abs=1e-4)
    cpu = torch.device("cpu")
    assert not use_compile(tiny(tmp_path, "--max_steps=199")[1], cpu)  # too short to repay the compile
    assert use_compile(tiny(tmp_path, "--max_steps=200")[1], cpu) == (shutil.which("g++") is not None)


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(*tiny(tmp_path, "--max_steps=3", "--wandb_project=sslens-test"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith((run / "wandb_id").read_text().strip())
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]  # the local log is written as well


@pytest.mark.parametrize("preset", ["1.25M", "5M"])
def test_flops_per_token_matches_torch_flop_counter(preset):
    from torch.utils.flop_counter import FlopCounterMode

    from sslens import HookedLlama
    from sslens.flops import flops_per_token

    model = HookedLlama.from_preset(preset).eval()
    tokens = torch.randint(0, 4096, (1, model.cfg.n_ctx))
    # hooking the pattern forces the explicit attention matmuls, which the counter sees (it has no formula for
    # the CPU flash-attention kernel)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), lambda t, hook: None)])
    assert flops_per_token(model.cfg, training=False) == pytest.approx(
        counter.get_total_flops() / model.cfg.n_ctx, rel=0.01
    )


@pytest.mark.slow
def test_two_ddp_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 2 against 1 process x batch 4: the same losses, step by step."""
    write_tokenizer(tmp_path)
    common = [*TINY, "--max_steps=8", f"--tokenizer={tmp_path / 'tok.json'}"]
    single = train(
        *tiny(tmp_path, "--max_steps=8", f"--tokenizer={tmp_path / 'tok.json'}", "--batch_size=4", name="single")
    )
    r = torchrun_train(*common, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp, ref = metrics(tmp_path / "ddp"), metrics(single)
    assert [m["step"] for m in ddp] == [m["step"] for m in ref] and ddp[-1]["tokens"] == ref[-1]["tokens"]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, ref)) <= 1e-5
    assert saved_steps(tmp_path / "ddp") == saved_steps(single)


@pytest.mark.slow
def test_ddp_ranks_exit_together_when_rank0_refuses(tmp_path):
    """An existing run without --resume: rank 0 refuses, and rank 1 gets the same error instead of waiting for rank 0
    at a barrier until the process-group timeout."""
    train(*tiny(tmp_path, "--max_steps=2"))
    r = torchrun_train(*TINY, "--max_steps=2", f"--out_dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode != 0 and r.stderr.count("already holds a run") == 2, r.stderr[-2000:]


def test_too_little_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 2**20, 2**20))
    with pytest.raises(SSLensError, match=r"has 0.00 GiB free but 5 checkpoints of this model need about [\d.]+ GiB"):
        train(*tiny(tmp_path, "--max_steps=5"))
    assert saved_steps(tmp_path / "run") == []


def test_a_run_without_a_terminal_prints_plain_progress_and_a_summary(tmp_path):
    """stderr a pipe (a log file, CI, a scheduler): no bar, but a plain line every print_every steps and at the end,
    and one summary line with the final losses that metrics.jsonl holds."""
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslens",
            "train",
            "1.25M",
            *TINY,
            "--max_steps=12",
            "--print_every=5",
            f"--out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["5/12", "10/12", "12/12"], r.stderr
    assert all(
        re.fullmatch(r"step \d+/12 loss [\d.]+( val_loss [\d.]+)? tok/s [\d,]+ elapsed \d+m\d\ds eta \d+m\d\ds", l)
        for l in lines
    ), lines
    last = metrics(out)[-1]
    summary = (
        f"final train loss {last['loss']:.4f}, final validation loss {last['val_loss']:.4f}; "
        f"checkpoints in {out / 'checkpoints'}"
    )
    assert re.fullmatch(rf"finished 12 steps in \d+m\d\ds, {re.escape(summary)}", r.stdout.splitlines()[-1]), r.stdout


def test_only_the_newest_checkpoints_keep_the_optimizer_state_and_resume_is_still_exact(tmp_path):
    """Weights in every checkpoint, trainer.pt (twice their size) in the newest keep_trainer_states only: older
    checkpoints load for analysis, and a run resumed from the newest ends bitwise where an uninterrupted one does."""
    from sslens.checkpoint import checkpoint_dir, resumable_steps, saved_steps

    write_tokenizer(tmp_path)
    tok = f"--tokenizer={tmp_path / 'tok.json'}"
    every = ["--checkpoint_schedule=linear", "--checkpoint_every=2"]
    reference = train(*tiny(tmp_path, "--max_steps=12", *every, tok, name="reference"))
    assert saved_steps(reference) == list(range(0, 13, 2)) and resumable_steps(reference) == [10, 12]
    weights = {s: (checkpoint_dir(reference, s) / "model.safetensors").stat().st_size for s in saved_steps(reference)}
    state = (checkpoint_dir(reference, 12) / "trainer.pt").stat().st_size
    assert 1.9 * weights[12] < state < 2.2 * weights[12]  # AdamW's two moments: what the dropped files saved
    assert not torch.equal(load_model(reference, 4).W_E, load_model(reference, 6).W_E)  # old steps still load
    run = train(*tiny(tmp_path, "--max_steps=12", *every, "--keep_trainer_states=3", tok))
    assert resumable_steps(run) == [8, 10, 12]
    for step in (10, 12):  # as if killed after step 8's checkpoint
        shutil.rmtree(checkpoint_dir(run, step))
    train(*tiny(tmp_path, "--max_steps=12", *every, "--keep_trainer_states=3", tok, "--resume"))
    assert resumable_steps(run) == [8, 10, 12]
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_model(run).state_dict().values(), load_model(reference).state_dict().values())
    )
    for step in (8, 10, 12):
        (checkpoint_dir(run, step) / "trainer.pt").unlink()
    with pytest.raises(SSLensError, match="no complete checkpoint with a trainer state"):
        train(*tiny(tmp_path, "--max_steps=14", *every, tok, "--resume"))
