import subprocess
import sys
from pathlib import Path

import pytest

from sslens import ConfigError, HookedLlama, ModelConfig, load_config, preset_names
from sslens.config import parameter_count, parse_overrides

from conftest import PRESETS

# layers/heads/d_model from the published SimpleStories models; d_mlp = int(8 d_model / 3); parameter counts exact.
ARCH = {
    "1.25M": (4, 4, 128, 341, 1_245_824),
    "5M": (6, 4, 256, 682, 5_374_208),
    "11M": (6, 6, 384, 1024, 11_015_040),
    "30M": (10, 8, 512, 1365, 29_627_904),
    "35M": (12, 8, 512, 1365, 35_133_952),
}


def test_presets_listed_smallest_first():
    assert preset_names() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_architecture_and_exact_parameter_count(name):
    n_layers, n_heads, d_model, d_mlp, n_params = ARCH[name]
    model = HookedLlama.from_preset(name, seed=0)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_mlp) == (n_layers, n_heads, d_model, d_mlp)
    assert d_mlp == int(8 * d_model / 3)
    assert (cfg.d_vocab, cfg.n_ctx, cfg.n_key_value_heads, cfg.eps, cfg.rotary_base) == (4096, 512, 2, 1e-6, 10000.0)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert parameter_count(cfg) == n_params  # the count the memory check uses, from the config alone


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layers=1, d_model=12, n_heads=6, n_key_value_heads=3, d_mlp=7, d_vocab=13, n_ctx=5),
        dict(n_layers=3, d_model=64, n_heads=8, n_key_value_heads=1, d_mlp=1, d_vocab=2, n_ctx=1),
        dict(n_layers=2, d_model=48, n_heads=2, n_key_value_heads=2, d_mlp=333, d_vocab=1001, n_ctx=64),
    ],
)
def test_parameter_count_of_odd_shapes_is_exact(shape):
    cfg = ModelConfig(**shape)
    assert parameter_count(cfg) == sum(p.numel() for p in HookedLlama(cfg).parameters())


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the peak resident memory is read from /proc")
def test_memory_estimate_bounds_a_measured_forward():
    """Against what a forward really takes: a fresh process runs 1.25M over 4096 tokens with every attention pattern
    materialised (the costliest path); the growth of its peak resident memory must lie within the estimate's
    activations, and the estimate must not be more than twice it (it would refuse models that fit). The peak is
    the process's own VmHWM: getrusage's ru_maxrss would start from the forking pytest process's size."""
    script = """
import gc, torch
from sslens import HookedLlama
from sslens.config import memory_needed, parameter_count
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
torch.set_num_threads(1)
model = HookedLlama.from_preset("1.25M", n_ctx=4096).eval()
tokens = torch.randint(0, 4096, (1, 4096))
gc.collect()
before = peak()
with torch.no_grad():
    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), lambda x, hook: x)])
print(peak() - before, memory_needed(model.cfg) - 4 * parameter_count(model.cfg))
"""
    measured, estimate = map(
        int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    )
    assert measured <= estimate <= 2 * measured, (measured, estimate)


def test_config_uses_transformerlens_field_names():
    cfg = load_config("5M")
    assert cfg.d_head == 64 and cfg.rotary_dim == 64 and cfg.d_vocab_out == 4096
    assert (cfg.normalization_type, cfg.positional_embedding_type, cfg.act_fn) == ("RMS", "rotary", "silu")
    assert cfg.gated_mlp is True and cfg.attn_only is False and cfg.original_architecture == "LlamaForCausalLM"


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (HookedLlama.from_preset("1.25M", seed=s) for s in (0, 0, 1))
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))
    assert not (a.W_E == c.W_E).all()


def test_round_trip_and_yaml_file(tmp_path):
    cfg = load_config("11M", n_layers=2, eps=1e-5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "m.yaml"
    path.write_text("n_layers: 2\nd_model: 64\nn_heads: 4\nn_key_value_heads: 1\nd_mlp: 170\neps: 1e-5\n")
    cfg = load_config(path)
    assert cfg.eps == 1e-5 and isinstance(cfg.eps, float)  # YAML 1.1 reads '1e-5' as a string


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["--n_layers=2", "eps=1e-5", "model_name=x"]) == {
        "n_layers": 2,
        "eps": "1e-5",
        "model_name": "x",
    }
    assert parse_overrides(["--resume", "--compile=False"]) == {"resume": True, "compile": False}  # a bare flag is True
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["n_layers"])


def test_a_number_given_for_text_is_its_text():
    """YAML reads `--checkpoint_schedule=200` as a number; one checkpoint step (and a numeric directory name) work."""
    from sslens.checkpoint import checkpoint_steps
    from sslens.config import load_train_config

    cfg = load_train_config(
        "1.25M", **parse_overrides(["--checkpoint_schedule=200", "--out_dir=2024", "--max_steps=300"])
    )[1]
    assert (cfg.checkpoint_schedule, cfg.out_dir) == ("200", "2024")
    assert checkpoint_steps(cfg.checkpoint_schedule, cfg.max_steps, cfg.checkpoint_every) == {200, 300}
    with pytest.raises(ConfigError, match="out_dir must be str, got True"):
        load_train_config("1.25M", out_dir=True)


def test_compile_takes_booleans_and_auto():
    from sslens.config import load_train_config

    assert load_train_config("5M")[1].compile == "auto"
    for given, read in [(False, "false"), (True, "true"), ("auto", "auto"), ("false", "false")]:
        assert load_train_config("5M", compile=given)[1].compile == read
    with pytest.raises(ConfigError, match="compile must be auto, true or false, got 'sometimes'"):
        load_train_config("5M", compile="sometimes")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_heads": 3}, "n_heads"),  # d_model 128 not divisible by 3
        ({"n_key_value_heads": 3}, "n_key_value_heads"),  # 4 heads not divisible by 3 KV heads
        ({"n_layers": "four"}, "n_layers"),
        ({"n_layers": True}, "n_layers"),
        ({"eps": "small"}, "eps"),
        ({"n_layers": 0}, "n_layers"),
        ({"eps": -1.0}, "eps"),
        ({"d_model": 120, "n_heads": 8}, "d_head"),  # d_head 15 is odd: RoPE rotates pairs
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("1.25M", **overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("n_layers: [1\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "partial.yaml").write_text("n_layers: 2\n")
    with pytest.raises(ConfigError, match="missing config key"):
        load_config(tmp_path / "partial.yaml")


@pytest.mark.parametrize(
    "args, words",
    [
        (["model", "5M", "--n_heads=3"], "n_heads"),
        (["model", "nope"], "unknown preset"),
        (["model", "5M", "--bogus=1"], "bogus"),
        (["model", "5M", "--n_layers=four"], "n_layers"),
    ],
)
def test_cli_reports_bad_config_in_one_line(args, words):
    r = subprocess.run([sys.executable, "-m", "sslens.cli", *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sslens: error:") and words in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_model_prints_hooks_and_exports(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sslens.cli", "model", "1.25M", "--n_layers=2", "--export", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        check=True,
    )
    n_params = sum(p.numel() for p in HookedLlama.from_preset("1.25M", n_layers=2).parameters())
    assert f"{n_params:,} parameters" in r.stdout and "blocks.0.attn.hook_pattern" in r.stdout
    assert "blocks.2." not in r.stdout
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
