"""Runs that cannot lie or be corrupted: validation on held-out stories, one writer per run directory, interrupts
that keep the work, a damaged metrics.jsonl and a full disk. Processes, locks and signals are real."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_train import TINY, metrics, tiny, write_tokenizer

from sslens import SSLensError, load_model
from sslens.checkpoint import read_metrics, read_split, saved_steps
from sslens.data import load_stories, tokenize, train_val, validation_stories
from sslens.tokenizer import load_tokenizer
from sslens.train import train

from conftest import free_port


@pytest.fixture
def story_file(tmp_path):
    """A .jsonl source without a test split: 400 distinct stories of the embedded corpus."""
    stories = [f"story {i}. {s}" for i, s in enumerate(load_stories("synth:400")["story"])]
    path = tmp_path / "stories.jsonl"
    pd.DataFrame({"story": stories}).to_json(path, orient="records", lines=True)
    return path


def story_ids(stream: np.ndarray, eos: int) -> set[tuple[int, ...]]:
    """The stories of a token stream, each as its ids (the stream is story + [EOS], one after another)."""
    cuts = np.flatnonzero(stream == eos)
    return {tuple(part) for part in np.split(np.asarray(stream), cuts + 1) if len(part)}


def independent_val_loss(run, step: int, stories: list[str], n_windows: int) -> float:
    """The mean next-token loss on the first `n_windows` windows of these stories, encoded directly."""
    model, tok = load_model(run, step=step), load_tokenizer(run / "tokenizer.json")
    eos = tok.token_to_id("[EOS]")
    stream = torch.tensor([i for s in stories for i in tok.encode(s, add_special_tokens=False).ids + [eos]])
    n_ctx = model.cfg.n_ctx
    windows = torch.stack(
        [stream[i * n_ctx : (i + 1) * n_ctx + 1] for i in range(min(n_windows, (len(stream) - 1) // n_ctx))]
    )
    with torch.no_grad():
        logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()).item()


def test_validation_reads_the_held_out_stories_of_a_file_source(tmp_path, story_file):
    """Two seeds on a source without a test split: each run records its held-out rows, trains on none of them,
    and logs the loss of exactly those stories; the two splits differ and get their own token caches."""
    write_tokenizer(tmp_path)
    runs = {
        seed: train(
            *tiny(
                tmp_path,
                "--max_steps=3",
                f"--data={story_file}",
                f"--seed={seed}",
                "--val_every=3",
                f"--tokenizer={tmp_path / 'tok.json'}",
                name=f"seed{seed}",
            )
        )
        for seed in (0, 1)
    }
    tok = load_tokenizer(tmp_path / "tok.json")
    held, caches = {}, []
    for seed, run in runs.items():
        record = read_split(run)
        assert record["seed"] == seed and record["validation"] == "held out" and record["val_stories"] == 4
        split = train_val(story_file, seed=seed)
        held[seed] = set(split.val["story"])
        assert list(validation_stories(record)["story"]) == list(split.val["story"])
        assert held[seed].isdisjoint(split.train["story"]) and len(split.train) + len(split.val) == 400
        train_stream, val_stream = tokenize(split.train, tok), tokenize(split.val, tok)
        caches += [train_stream.filename, val_stream.filename]
        assert story_ids(train_stream, 1).isdisjoint(story_ids(val_stream, 1))
        assert not np.array_equal(train_stream[: len(val_stream)], val_stream)
        logged = metrics(run)[-1]["val_loss"]
        assert logged == pytest.approx(independent_val_loss(run, 3, list(split.val["story"]), 8 * 4), abs=2e-5)
    assert held[0] != held[1]
    assert len(set(caches)) == 4  # each seed's training and validation streams: four token-cache files


def test_resume_refuses_another_split(tmp_path, story_file):
    train(*tiny(tmp_path, "--max_steps=2", f"--data={story_file}"))
    with pytest.raises(SSLensError, match="differ from those in .*split.json"):
        train(*tiny(tmp_path, "--max_steps=4", f"--data={story_file}", "--seed=1", "--resume"))
    lines = story_file.read_text().splitlines()
    story_file.write_text("\n".join(lines[:-1]) + "\n")  # the data file lost a story since the run started
    with pytest.raises(SSLensError, match="differ from those in .*split.json"):
        train(*tiny(tmp_path, "--max_steps=4", f"--data={story_file}", "--resume"))


def start(*args: str) -> subprocess.Popen:
    """`sslens train 1.25M TINY ARGS` as a real process."""
    return subprocess.Popen(
        [sys.executable, "-m", "sslens", "train", "1.25M", *TINY, "--compile=False", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def holder(out) -> int | None:
    """The PID in a run directory's lock file."""
    try:
        return int((out / ".lock").read_text())
    except (OSError, ValueError):
        return None


def refused_second(out, *args: str) -> str:
    """A second `sslens train` into `out`, which must be refused in one line; its stderr."""
    r = subprocess.run(
        [sys.executable, "-m", "sslens", "train", "1.25M", *TINY, "--compile=False", f"--out_dir={out}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_one_writer_per_run_directory(tmp_path):
    """A second start into a running run's directory, new or --resume, is refused naming the PID that holds it,
    and changes nothing; a SIGKILLed holder blocks nobody."""
    out = tmp_path / "run"
    first = start(f"--out_dir={out}", "--max_steps=100000", "--checkpoint_schedule=0,1", "--lr=1e-3")
    wait_for(lambda: 0 in saved_steps(out), first)
    err = refused_second(out, "--max_steps=3", "--lr=5e-3")
    assert f"{out} is being written by another sslens process (PID {first.pid})" in err
    err = refused_second(out, "--max_steps=100000", "--resume")
    assert f"(PID {first.pid})" in err
    first.kill()
    first.wait()
    assert (out / ".lock").exists() and "lr: 0.001" in (out / "config.yaml").read_text()
    resumed = start(f"--out_dir={out}", "--max_steps=100000", "--checkpoint_schedule=0,1", "--resume")
    wait_for(lambda: holder(out) == resumed.pid, resumed)  # the dead holder's lock blocked nothing
    err = refused_second(out, "--max_steps=100000", "--resume")
    assert f"(PID {resumed.pid})" in err
    resumed.kill()
    resumed.wait()
    steps = [m["step"] for m in metrics(out)]
    assert steps == sorted(set(steps))  # each step once: the refused starts wrote no line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_checkpoints_the_step_and_resume_ends_bitwise_equal(tmp_path, signum):
    """SIGINT/SIGTERM mid-run: the step in progress is finished and checkpointed, one line says so, the exit status
    is 130/143; --resume then ends with the weights and metrics of an uninterrupted run."""
    write_tokenizer(tmp_path)
    args = ["--max_steps=60", f"--tokenizer={tmp_path / 'tok.json'}"]
    reference = train(*tiny(tmp_path, *args, name="reference"))
    out = tmp_path / "run"
    proc = start(*args, f"--out_dir={out}")
    wait_for(lambda: 8 in saved_steps(out), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    step = saved_steps(out)[-1]
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"sslens: interrupted at step {step}; checkpoint saved; continue with --resume"
    assert 8 <= step < 60 and metrics(out)[-1]["step"] == step and not (out / ".lock").exists()
    r = subprocess.run(
        [sys.executable, "-m", "sslens", "train", "1.25M", *TINY, *args, f"--out_dir={out}", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    final, expected = load_model(out), load_model(reference)
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), expected.state_dict().values()))
    assert [m["step"] for m in metrics(out)] == list(range(1, 61))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(reference)]


def test_a_second_interrupt_exits_at_once_and_corrupts_nothing(tmp_path):
    """Two SIGINTs, the second arriving while a checkpoint is half-written (weights written, trainer state not):
    the process exits at once with 130; the half-written step is never a checkpoint, every one left loads, and
    --resume finishes the run."""
    out = tmp_path / "run"
    interrupt_twice = (
        "import os, signal, sys, time, torch\nfrom sslens.cli import main\nsave = torch.save\n"
        "def save_interrupted(obj, f):\n    if obj['step'] == 8:\n"
        "        for _ in range(2):\n            os.kill(os.getpid(), signal.SIGINT)\n"
        "            time.sleep(0.5)\n    save(obj, f)\ntorch.save = save_interrupted\nmain(sys.argv[1:])\n"
    )
    cmd = ["train", "1.25M", *TINY, f"--out_dir={out}", "--max_steps=12"]
    r = subprocess.run([sys.executable, "-c", interrupt_twice, *cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.splitlines()[-1] == "sslens: interrupted again; exiting now (the newest complete checkpoint is kept)"
    )
    assert saved_steps(out) == [0, 1, 2, 4] and len(list((out / "checkpoints").glob(".tmp-*"))) == 1
    for step in saved_steps(out):
        load_model(out, step=step)
    r = subprocess.run([sys.executable, "-m", "sslens", *cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and saved_steps(out) == [0, 1, 2, 4, 8, 12], r.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path):
    """Rank 0 holds the run's lock (a second start is refused); SIGTERM to torchrun, which passes it to both ranks:
    both stop after the same step, rank 0 checkpoints it."""
    out = tmp_path / "ddp"
    proc = subprocess.Popen(
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
            *TINY,
            "--batch_size=2",
            "--compile=False",
            "--max_steps=100000",
            f"--out_dir={out}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for(lambda: 8 in saved_steps(out), proc)
    assert "is being written by another sslens process (PID" in refused_second(out, "--max_steps=3")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if "interrupted at step" in l]
    step = saved_steps(out)[-1]
    assert len(lines) == 2 and all(
        l.endswith(f"interrupted at step {step}; checkpoint saved; continue with --resume") for l in lines
    ), err[-3000:]
    assert metrics(out)[-1]["step"] == step


def test_resume_drops_a_metrics_line_cut_short(tmp_path, capsys):
    """A last line cut mid-record (a full disk, a kill): --resume warns, drops it and goes on; each step once."""
    run = train(*tiny(tmp_path, "--max_steps=4"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens": 64')
    capsys.readouterr()
    train(*tiny(tmp_path, "--max_steps=6", "--resume"))
    assert "metrics.jsonl: dropped line 5, not a complete record" in capsys.readouterr().err
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))


def test_a_full_disk_names_the_checkpoint_and_the_room_it_needs(tmp_path, small_disk, monkeypatch):
    """A real 12 MiB filesystem that fills at the third checkpoint (the start-up estimate bypassed, as when
    something else fills the disk): one line naming the checkpoint and its size; no partial directory is left and
    the earlier checkpoints load."""
    import sslens.train

    monkeypatch.setattr(sslens.train, "check_free_space", lambda *args: None)
    out = small_disk("12m") / "run"
    with pytest.raises(
        SSLensError,
        match=r"the disk is full: writing .*/checkpoints/step_\d{7} needs about [\d.]+ MiB "
        r"and [\d.]+ MiB is free",
    ) as refusal:
        train(*tiny(tmp_path, "--max_steps=8", f"--out_dir={out}"))
    full_at = int(re.search(r"step_(\d{7})", str(refusal.value)).group(1))
    assert saved_steps(out) == [s for s in (0, 1, 2, 4, 8) if s < full_at] and saved_steps(out)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    for step in saved_steps(out):
        assert all(torch.isfinite(p).all() for p in load_model(out, step=step).parameters())


def test_a_full_disk_names_the_metrics_file(tmp_path, small_disk, monkeypatch):
    """The disk fills after checkpoint 1 (another program's file takes the rest): once metrics.jsonl needs a new
    block, its write fails with one line naming it."""
    import sslens.train

    out = small_disk("16m") / "run"
    save = sslens.train.save_checkpoint

    def save_then_fill(run_dir, step, *args):
        save(run_dir, step, *args)
        if step == 0:
            return
        try:
            with open(out.parent / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass

    monkeypatch.setattr(sslens.train, "check_free_space", lambda *args: None)
    monkeypatch.setattr(sslens.train, "save_checkpoint", save_then_fill)
    with pytest.raises(
        SSLensError, match=r"the disk is full: writing .*/run/metrics.jsonl needs more room and 0.0 MiB is free"
    ):
        train(*tiny(tmp_path, "--max_steps=100", "--checkpoint_schedule=0,1", f"--out_dir={out}"))
    records, cut = read_metrics(out / "metrics.jsonl")  # the lines that fit the file's last block, maybe one cut
    assert saved_steps(out) == [0, 1] and 1 < len(records) < 99 and len(cut) <= 1
