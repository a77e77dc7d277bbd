import fnmatch
import itertools
import json
import re
import subprocess
import sys

import pytest
import torch

from sslens.bench import bench_model, interleaved


def test_interleaved_alternates_sides_and_warms_up():
    calls = []
    t_ours, t_peer = interleaved(lambda: calls.append("o"), lambda: calls.append("p"), reps=3)
    assert calls == ["o", "p", "o", "p", "p", "o", "o", "p"]
    assert len(t_ours) == len(t_peer) == 3


def test_bench_rows_on_a_tiny_run():
    rows = bench_model("1.25M", batch=1, seq=16, reps=2)
    assert [r.name for r in rows] == ["forward_nohooks_vs_hf", "cache_vs_tl_bridge"]
    assert all(r.ours_tok_s > 0 and r.peer_tok_s > 0 and r.ratio > 0 for r in rows)


def test_train_rows_on_a_tiny_run():
    from sslens.bench import bench_train

    rows = bench_train(("1.25M",), batch=1, seq=16, reps=1, compiled=(False,))
    assert [r.name for r in rows] == ["train_fp32_vs_hf_1.25M"] and rows[0].ours_tok_s > 0 and rows[0].goal == 1.1
    assert all(0 < m < 1 for m in rows[0].mfu)


def test_generate_rows_on_a_tiny_run():
    from sslens.bench import bench_generate

    rows = bench_generate("1.25M", batches=(1,), new_tokens=4, reps=1)
    assert [r.name for r in rows] == ["generate_b1_vs_hf", "generate_b1_compiled_vs_hf"] and [r.goal for r in rows] == [
        None,
        4.0,
    ]
    assert all(r.ours_tok_s > 0 and r.peer_tok_s > 0 for r in rows)


def test_explorer_timing():
    from sslens.bench import bench_explorer, format_explorer

    result = bench_explorer("1.25M", prompt_tokens=8, max_new_tokens=3, reps=1)
    assert result["explorer_ms"]["ms"] > 0 and result["explorer_ms"]["goal_ms"] == 300
    assert "explorer_no_generation_ms" in format_explorer(result)
    assert result["explorer_tuned_lens_extra_ms"]["goal_ms"] == 20
    assert "explorer_tuned_lens_extra_ms" in format_explorer(result)


def test_tuned_lens_training_time():
    from sslens.bench import bench_tuned_lens_train, format_tuned_lens_train

    result = bench_tuned_lens_train("1.25M", tokens=2 * 8 * 256)
    r = result["tuned_lens_train_s"]
    assert r["s"] > 0 and r["tokens"] == 4096 and r["tok_s"] == pytest.approx(4096 / r["s"]) and r["goal_s"] == 120
    assert re.search(
        r"tuned_lens_train_s .* s  \(4,096 tokens, [\d,]+ tok/s; goal <= 120 s \[(ok|MISSED)\]\)",
        format_tuned_lens_train(result),
    )


def test_probe_rows():
    from sslens.bench import bench_probe

    rows, fit = bench_probe("1.25M", stories=4, seq=16, reps=1, fit_stories=200, classes=5)
    assert [r.name for r in rows] == ["harvest_one_hook_vs_full_cache"] and rows[0].ours_tok_s > 0
    assert fit["probe_fit_s_per_hook"]["s"] > 0 and fit["probe_fit_s_per_hook"]["classes"] == 5


def test_patching_rows():
    from sslens.bench import bench_patching

    rows = bench_patching("1.25M", pos=4, pair_pos=6, reps=1)
    names = ["patch_heads_vs_tl", "attribution_vs_activation", "attribution_vs_activation_4_tokens"]
    assert [r.name for r in rows] == names and not any(r.error for r in rows)
    assert [r.goal for r in rows] == [5.0, 20.0, None] and all(r.ours_tok_s > 0 and r.peer_tok_s > 0 for r in rows)


def test_sae_rows():
    from sslens.bench import bench_sae, format_rows

    rows = bench_sae("1.25M", d_sae=256, k=8, batch_tokens=256, reps=1)
    assert [r.name for r in rows] == ["sae_train_step", "sae_activation_stream_vs_forward"]
    assert not any(r.error for r in rows) and all(r.ours_tok_s > 0 and r.peer_tok_s > 0 for r in rows)
    assert [r.goal for r in rows] == [0.5, 0.8] and all(0 < m < 2 for m in rows[0].mfu)
    text = format_rows(rows, "")
    assert re.search(r"sae_train_step .* 50% .*\[(ok|MISSED)\] \(MFU \d+% vs \d+%\)", text)


def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslens.cli",
            "bench",
            "--preset",
            "1.25M",
            "--batch",
            "1",
            "--seq",
            "8",
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "forward_nohooks_vs_hf" in r.stdout and "cache_vs_tl_bridge" in r.stdout
    assert set(json.loads(out.read_text())) == {
        "forward_nohooks_vs_hf",
        "cache_vs_tl_bridge",
        "generate_b1_vs_hf",
        "generate_b8_vs_hf",
        "train_fp32_vs_hf_1.25M",
        "explorer_ms",
        "explorer_no_generation_ms",
        "harvest_one_hook_vs_full_cache",
        "probe_fit_s_per_hook",
        "patch_heads_vs_tl",
        "attribution_vs_activation",
        "attribution_vs_activation_6_tokens",  # --quick patches 6-token prompts
        "sae_train_step",
        "sae_activation_stream_vs_forward",
        "explorer_tuned_lens_extra_ms",
        "tuned_lens_train_s",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is not refused")
def test_cuda_without_a_gpu_is_refused():
    r = subprocess.run([sys.executable, "-m", "sslens", "bench", "--device", "cuda"], capture_output=True, text=True)
    assert r.returncode == 2 and "no CUDA device; use --device cpu" in r.stderr and "Traceback" not in r.stderr


def test_a_row_that_fails_says_why_and_the_table_goes_on():
    from sslens.bench import Row, attempt, format_rows

    def broken() -> Row:
        raise RuntimeError("peer needs transformers>=9\nsecond line")

    fine = Row("fine_vs_peer", 2.0, "peer", 1.0, 2.0, goal=1.5)
    rows = [attempt("broken_vs_peer", "peer", 1.0, broken), attempt("fine_vs_peer", "peer", 1.5, lambda: fine)]
    assert rows[0].error == "RuntimeError: peer needs transformers>=9" and rows[0].ratio != rows[0].ratio  # NaN
    assert rows[1] is fine
    table = format_rows(rows, "header").splitlines()
    assert table[2].split() == [
        "broken_vs_peer",
        "not",
        "measured:",
        "RuntimeError:",
        "peer",
        "needs",
        "transformers>=9",
    ]
    assert table[3].startswith("fine_vs_peer") and "[ok]" in table[3]


def test_cli_train_suite_runs_the_training_rows_alone(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslens",
            "bench",
            "--suite",
            "train",
            "--preset",
            "1.25M",
            "--batch",
            "1",
            "--seq",
            "8",
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert set(json.loads(out.read_text())) == {"train_fp32_vs_hf_1.25M"} and "train_fp32_vs_hf_1.25M" in r.stdout


def test_benchmarks_md_states_the_goals_bench_checks():
    """Each line of BENCHMARKS.md's table of rows states exactly the goals bench.GOALS sets for its rows."""
    from pathlib import Path

    from sslens.bench import GOALS, goal_of

    text = (Path(__file__).resolve().parent.parent / "BENCHMARKS.md").read_text()
    lines = text.split("## Rows")[1].split("\n\n")[1].splitlines()[2:]
    covered = set()
    for line in lines:
        names_cell, goal_cell = line.split("|")[1], line.split("|")[-2]
        rows = [row for name in re.findall(r"`([^`]+)`", names_cell) for row in expand(name)]
        stated = {float(x) for x in re.findall(r"([\d.]+) ?(?:x|ms|s)\b", goal_cell)}
        stated |= {float(x) / 100 for x in re.findall(r"([\d.]+)% MFU", goal_cell)}
        assert stated == {goal_of(row) for row in rows} - {None}, (rows, goal_cell)
        covered |= {pattern for pattern in GOALS for row in rows if fnmatch.fnmatchcase(row, pattern)}
    assert covered == set(GOALS)


def expand(name: str) -> list[str]:
    """The rows a table name stands for: `generate_b{1,8}[_compiled]_vs_hf` is four rows."""
    parts = re.split(r"(\{[^}]*\}|\[[^\]]*\])", name.replace("{preset}", "5M"))
    options = [p[1:-1].split(",") if p.startswith("{") else ["", p[1:-1]] if p.startswith("[") else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]
