"""Bad input end to end: every case exits 2 with one actionable line and no traceback, and writes nothing.

Most cases call the CLI's own entry point, `sslens.cli.main`, in this process (the same argument parsing, error
handling and exit code as the console script, without a fresh interpreter per case); a few run the real
subprocess to show the two agree. The config and override parsers are fuzzed with hypothesis."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_data import BAD_FILES, write_bad_data_files

from sslens import HookedLlama
from sslens.cli import main
from sslens.config import ConfigError, TrainConfig, load_config, load_train_config, parse_overrides, settable_fields
from sslens.errors import SSLensError
from sslens.tokenizer import placeholder_tokenizer, save_tokenizer

TINY = [
    "--n_layers=1",
    "--d_model=32",
    "--n_heads=2",
    "--n_key_value_heads=1",
    "--d_mlp=64",
    "--d_vocab=512",
    "--n_ctx=32",
    "--batch_size=2",
    "--max_steps=2",
    "--data=synth:300",
    "--compile=False",
]


def run_main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, capsys.readouterr().err


def expect_refusal(capsys, args: list[str], words: str) -> None:
    code, err = run_main(capsys, *args)
    assert code == 2 and err.startswith("sslens: error: ") and err.count("\n") == 1 and words in err, err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "malformed.yaml").write_text("n_layers: [1,\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no_text.jsonl").write_text('{"title": "a"}\n{"title": "b"}\n')
    (tmp_path / "a_file").write_text("keep me")
    save_tokenizer(placeholder_tokenizer(1024), tmp_path / "tok1024.json")
    write_bad_data_files(tmp_path)  # the bad-data cases below
    (tmp_path / "few.jsonl").write_text("".join(f'{{"story": "mia saw {i} birds."}}\n' for i in range(60)))
    return tmp_path


TRAIN_CASES = [
    (lambda d: [str(d / "malformed.yaml")], "malformed YAML"),
    (lambda d: ["1.25M", "--n_layerz=2"], "unknown config key 'n_layerz'"),
    (lambda d: ["1.25M", "--n_layers=two"], "n_layers must be"),
    (lambda d: ["1.25M", "--d_model=100", "--n_heads=3"], "must be divisible by n_heads"),
    (lambda d: ["1.25M", "--n_heads=4", "--n_key_value_heads=3"], "n_key_value_heads"),
    (lambda d: ["1.25M", "--data=" + str(d / "missing.parquet")], "not found"),
    (lambda d: ["1.25M", "--data=" + str(d / "empty.txt")], "holds no stories"),
    (lambda d: ["1.25M", "--data=" + str(d / "no_text.jsonl")], "has no text column"),
    (
        lambda d: ["1.25M", "--tokenizer=" + str(d / "tok1024.json")],
        "tokenizer has 1024 tokens but the model's d_vocab is 512",
    ),
    (lambda d: ["1.25M", "--out_dir=" + str(d / "a_file")], "is a file"),
    (lambda d: ["1.25M", "--out_dir=/proc/sslens-cannot-write-here"], "sslens-cannot-write-here"),
    (lambda d: ["1.25M", "--resume"], "no complete checkpoint to resume from"),
]
# Data files datasets cannot read, or reads wrongly: each named with its fault (issue 17, data pipeline).
TRAIN_CASES += [
    (lambda d, name=name: ["1.25M", f"--data={d / name}"], words)
    for name, words in BAD_FILES
    if name in ("empty.jsonl", "latin1.txt", "no_rows.parquet", "cut_line.jsonl", "dir_without_data")
]
# Runs that would fail late: a context too short for the validation samples, held-out stories shorter than a window.
TRAIN_CASES += [
    (lambda d: ["1.25M", "--n_ctx=4"], "n_ctx 4 leaves no room to continue the validation samples' prompt"),
    (lambda d: ["1.25M", f"--data={d / 'few.jsonl'}"], "the validation stories (held out) hold "),
]


@pytest.mark.parametrize("out_exists", [False, True], ids=["new out_dir", "existing out_dir"])
@pytest.mark.parametrize("case, words", TRAIN_CASES, ids=[w for _, w in TRAIN_CASES])
def test_train_refusals_write_nothing(case, words, out_exists, files, capsys):
    """Refused before anything is written: a new out_dir is not left behind, an existing one is left as it was."""
    args = case(files)
    out = files / "run"
    if out_exists:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    extra = [] if any(a.startswith("--out_dir") for a in args) else [f"--out_dir={out}"]
    config, *rest = args
    expect_refusal(capsys, ["train", config, *TINY, *rest, *extra], words)
    assert (files / "a_file").read_text() == "keep me"
    if out_exists:
        assert [p.name for p in out.rglob("*")] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    else:
        assert not out.exists()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny trained run, a copy with a truncated newest checkpoint, and one whose checkpoint holds another
    config's weights."""
    from sslens.config import load_train_config
    from sslens.train import train

    root = tmp_path_factory.mktemp("models")
    model_cfg, cfg = load_train_config("1.25M", **parse_overrides(TINY), out_dir=str(root / "run"))
    run = train(model_cfg, cfg)
    truncated = root / "truncated"
    shutil.copytree(run, truncated)
    path = sorted((truncated / "checkpoints").iterdir())[-1] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:500])
    other = root / "other"
    shutil.copytree(run, other)
    bigger = HookedLlama.from_preset(
        "1.25M", n_layers=2, d_model=64, n_heads=2, n_key_value_heads=1, d_mlp=64, d_vocab=512, n_ctx=32
    )
    for step_dir in (other / "checkpoints").iterdir():
        save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, step_dir / "model.safetensors")
    return {"run": run, "truncated": truncated, "other": other, "root": root}


GENERATE_CASES = [
    ("missing", [], "not found"),
    ("truncated", [], "model.safetensors is unreadable or from another config"),
    ("other", [], "model.safetensors is unreadable or from another config"),
    ("run", ["--prompt", "once " * 40], "the context is 32, so at most 31"),
    ("run", ["--prompt", ""], "empty prompt"),
    ("run", ["--prompt", "hello", "--temperature", "-1"], "temperature must be >= 0"),
]
# Sampling settings without meaning (issue 17 item 5; the rest of that block is at the end of this file).
GENERATE_CASES += [
    ("run", ["--prompt", "hello", "--num_samples", "0"], "num_samples must be >= 1, got 0"),
    ("run", ["--prompt", "hello", "--num_samples", "-1"], "num_samples must be >= 1, got -1"),
    ("run", ["--prompt", "hello", "--temperature", "inf"], "temperature must be >= 0 and finite (0 = greedy), got inf"),
    ("run", ["--prompt", "hello", "--temperature", "nan"], "temperature must be >= 0 and finite (0 = greedy), got nan"),
    ("run", ["--prompt", "hello", "--top_p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    ("run", ["--prompt", "hello", "--top_k", "0"], "top_k must be >= 1, got 0"),
]


@pytest.mark.parametrize("which, args, words", GENERATE_CASES)
def test_generate_refusals(which, args, words, model_dirs, capsys):
    path = model_dirs["root"] / "nowhere" if which == "missing" else model_dirs[which]
    before = sorted(p.stat().st_mtime_ns for p in model_dirs["root"].rglob("*") if p.is_file())
    expect_refusal(capsys, ["generate", str(path), *args], words)
    assert sorted(p.stat().st_mtime_ns for p in model_dirs["root"].rglob("*") if p.is_file()) == before


def test_a_non_ascii_prompt_is_continued_not_refused(model_dirs, capsys):
    """Accents and emoji are input, not errors: the tokenizer normalises or maps them to [UNK]."""
    main(["generate", str(model_dirs["run"]), "--prompt", "Élodie’s café 🙂", "--max_new_tokens", "3", "--seed", "0"])
    out = capsys.readouterr().out
    assert out.startswith("Élodie’s café 🙂") and len(out) > len("Élodie’s café 🙂")


def test_probe_unknown_label(model_dirs, tmp_path, capsys):
    before = sorted(p.stat().st_mtime_ns for p in model_dirs["root"].rglob("*") if p.is_file())
    expect_refusal(
        capsys,
        ["probe", str(model_dirs["run"]), "--label", "colour", "--max_stories", "20", "--out", str(tmp_path / "probe")],
        "has no label column 'colour'",
    )
    assert not (tmp_path / "probe").exists()
    assert sorted(p.stat().st_mtime_ns for p in model_dirs["root"].rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_the_console_command_agrees_on_every_case(files, model_dirs):
    """The whole matrix again, each case a real `python -m sslens` process (four at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    outs = [files / f"run{i}" for i in range(len(TRAIN_CASES))]  # one each: the processes run concurrently
    cases = [
        (
            ["train", *case(files)[:1], *TINY, *case(files)[1:]]
            + ([] if any(a.startswith("--out_dir") for a in case(files)) else [f"--out_dir={out}"]),
            words,
        )
        for (case, words), out in zip(TRAIN_CASES, outs)
    ]
    cases += [
        (["generate", str(model_dirs["root"] / "nowhere" if which == "missing" else model_dirs[which]), *args], words)
        for which, args, words in GENERATE_CASES
    ]
    cases += [
        (["probe", str(model_dirs["run"]), "--label", "colour", "--max_stories", "20"], "has no label column 'colour'")
    ]
    before = sorted(p.stat().st_mtime_ns for p in model_dirs["root"].rglob("*") if p.is_file())

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sslens", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [args for args, _ in cases]))
    for (args, words), r in zip(cases, results):
        assert r.returncode == 2 and r.stderr.startswith("sslens: error: ") and r.stderr.count("\n") == 1, (
            args,
            r.stderr,
        )
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not any(out.exists() for out in outs) and (files / "a_file").read_text() == "keep me"
    assert sorted(p.stat().st_mtime_ns for p in model_dirs["root"].rglob("*") if p.is_file()) == before


KEYS = [f.name for f in settable_fields()] + [f.name for f in settable_fields(TrainConfig)]
values = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True).map(str),
    st.sampled_from(["True", "false", "none", "1e-3", "-0", "[1, 2]", "{a: 1}", "'5'", "", "auto"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"--{kv[0]}={kv[1]}"), st.text(max_size=20)),
        max_size=4,
    )
)
def test_overrides_either_parse_into_a_valid_config_or_are_refused(items):
    try:
        model_cfg, cfg = load_train_config("1.25M", **parse_overrides(items))
    except (ConfigError, SSLensError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert model_cfg.d_model % model_cfg.n_heads == 0 and model_cfg.n_heads % model_cfg.n_key_value_heads == 0
    assert cfg.lr > 0 and cfg.max_steps > 0


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-1000, 10**5), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS[:12]), st.integers(), st.booleans(), st.none(), st.text(max_size=5)),
            yaml_values,
            max_size=12,
        ).map(lambda d: yaml.safe_dump(d, sort_keys=False).encode()),
        st.text(max_size=80).map(str.encode),
        st.binary(max_size=80),
    )
)
def test_config_files_either_load_or_are_refused(tmp_path, data):
    """Mapping files with keys of any type, any text, and bytes that are not UTF-8: a config or one line."""
    path = Path(tmp_path) / "fuzz.yaml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except (ConfigError, SSLensError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert cfg.d_model % cfg.n_heads == 0 and cfg.d_vocab > 0 and cfg.n_layers > 0


class Payload:
    """Unpickling this runs a command: what a hostile trainer.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_as_trainer_state_is_refused_not_executed(model_dirs, tmp_path, capsys):
    import pickle

    run = tmp_path / "run"
    shutil.copytree(model_dirs["run"], run)
    marker = tmp_path / "payload-ran"
    newest = sorted((run / "checkpoints").iterdir())[-1]
    (newest / "trainer.pt").write_bytes(pickle.dumps({"optimizer": Payload(marker)}))
    main(["train", "1.25M", *TINY, "--max_steps=3", "--resume", f"--out_dir={run}"])
    err = capsys.readouterr().err
    assert "trainer.pt is unreadable (UnpicklingError); it is refused, not executed" in err and not marker.exists()
    assert (run / "checkpoints" / "step_0000003").is_dir()


def test_a_trainer_state_with_missing_keys_is_named_not_a_traceback(model_dirs, tmp_path):
    import torch

    from sslens.checkpoint import load_trainer_state, saved_steps

    run = tmp_path / "run"
    shutil.copytree(model_dirs["run"], run)
    newest = saved_steps(run)[-1]
    torch.save({"step": newest}, run / "checkpoints" / f"step_{newest:07d}" / "trainer.pt")
    with pytest.raises(SSLensError, match=r"trainer.pt is not an sslens trainer state \(missing 'optimizer'\)"):
        load_trainer_state(run, newest)


# ---- Impossible sizes: models that cannot fit in memory, probes on too few stories, vocabularies below the
# alphabet (issue 17 item 5). Each case takes the paths below and must write nothing to `out`. ----


@pytest.fixture
def sized(tmp_path, model_dirs):
    """A run, an HF directory whose config.json asks for a model of exabytes (no weights: none are read), and an
    output path that a refused command must not create."""
    import json

    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 10**9,
                "intermediate_size": 2048,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 2,
                "vocab_size": 4096,
                "max_position_embeddings": 512,
            }
        )
    )
    return {"run": model_dirs["run"], "huge": huge, "out": tmp_path / "out"}


SIZE_CASES = [
    (
        lambda p: ["model", "1.25M", "--d_model=10000000", "--export", str(p["out"])],
        "(n_layers=4, d_model=10000000, d_mlp=341, d_vocab=4096, n_ctx=512) has 1,200,081,970,000,000 parameters",
    ),
    (lambda p: ["model", "1.25M", "--n_ctx=1000000", "--export", str(p["out"])], "GiB for its weights and one forward"),
    (lambda p: ["generate", str(p["huge"]), "--prompt", "hello"], "huge (n_layers=2, d_model=1000000000"),
    (
        lambda p: ["probe", str(p["run"]), "--label", "theme", "--max_stories", "2", "--out", str(p["out"])],
        "max_stories must be at least 5, not 2",
    ),
    (
        lambda p: ["tokenizer", "train", "--data", "synth:300", "--vocab-size", "10", "--out", str(p["out"])],
        "cannot hold these stories: [UNK], [EOS] and each character, alone and as a ##continuation, take 62; ask for "
        "at least 62",
    ),
    (lambda p: ["train", "1.25M", *TINY, "--d_vocab=40", f"--out_dir={p['out']}"], "ask for at least 62 (d_vocab"),
    (lambda p: ["train", "1.25M", *TINY, "--d_model=10000000", f"--out_dir={p['out']}"], "choose a smaller model"),
]


@pytest.mark.parametrize(
    "case, words",
    SIZE_CASES,
    ids=["model d_model", "model n_ctx", "generate huge HF", "probe", "tokenizer", "train d_vocab", "train d_model"],
)
def test_impossible_sizes_are_refused_in_one_line_writing_nothing(case, words, sized, capsys):
    """The model cases are refused from the config, before a tensor is allocated: within seconds."""
    start = time.perf_counter()
    expect_refusal(capsys, case(sized), words)
    assert time.perf_counter() - start < 10 and not sized["out"].exists()


@pytest.mark.slow
def test_the_console_command_agrees_on_the_size_cases(sized):
    """SIZE_CASES again, each a real `python -m sslens` process, the memory refusals with a generous time limit."""
    from concurrent.futures import ThreadPoolExecutor

    def run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "sslens", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return done, time.perf_counter() - start

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [case(sized) for case, _ in SIZE_CASES]))
    for (_, words), (r, seconds) in zip(SIZE_CASES, results):
        assert r.returncode == 2 and r.stderr.startswith("sslens: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr and seconds < 60, (r.stderr, seconds)
    assert not sized["out"].exists()
