"""Fine-tuning: `sslens train CONFIG --init_from=SOURCE` from a Llama that transformers made and saved."""

import json
import re

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from sslens import load_model
from sslens.checkpoint import saved_steps
from sslens.cli import main
from sslens.synth import generate
from sslens.tokenizer import encode, train_tokenizer


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A randomly initialised LlamaForCausalLM saved by transformers, with a tokenizer.json beside it."""
    path = tmp_path_factory.mktemp("source") / "tiny-llama"
    tok = train_tokenizer([s["story"] for s in generate(300, seed=5)], vocab_size=1024)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def sslens(*args: str, capsys) -> tuple[int, str]:
    """`sslens ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


TRAIN = [
    "--data=synth:600",
    "--batch_size=8",
    "--compile=False",
    "--val_every=10",
    "--warmup_steps=2",
    "--lr=3e-3",
    "--log_every=1",
]


def test_an_hf_llama_is_fine_tuned_from_its_own_weights(hf_source, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = sslens("train", "5M", f"--init_from={hf_source}", "--n_ctx=64", "--max_steps=20", *TRAIN,
                       "--checkpoint_schedule=0,20", f"--out_dir={run}", capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert saved_steps(run) == [0, 20]
    start, source = load_model(run, 0), load_model(hf_source)
    assert start.cfg.d_model == 64 and start.cfg.n_ctx == 64  # the source's shape, its context shrunk
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), source.state_dict().values()))
    assert start.tokenizer.to_str() == source.tokenizer.to_str()
    hf = LlamaForCausalLM.from_pretrained(hf_source).eval()
    tokens = torch.tensor([encode(start.tokenizer, generate(1, seed=9)[0]["story"], eos=False)[:64]])
    with torch.no_grad():
        torch.testing.assert_close(start(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns from there
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["init_from"] == str(hf_source) and recorded["d_model"] == 64


def test_fine_tuning_from_a_run_takes_its_checkpoint(hf_source, tmp_path, capsys):
    first = tmp_path / "first"
    assert sslens("train", "5M", f"--init_from={hf_source}", "--max_steps=4", *TRAIN, f"--out_dir={first}",
                  capsys=capsys)[0] == 0  # fmt: skip
    second = tmp_path / "second"
    code, err = sslens("train", "1.25M", f"--init_from={first}", "--init_step=2", "--max_steps=2", *TRAIN,
                       f"--out_dir={second}", capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert torch.equal(load_model(second, 0).W_E, load_model(first, 2).W_E)
    assert not torch.equal(load_model(second, 0).W_E, load_model(first, 4).W_E)


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--d_model=128"], "d_model is 64 in .*, not 128; a fine-tuned model keeps its source's shape"),
        (["--n_ctx=256"], "n_ctx 256 exceeds .*'s 128"),
        (["--resume"], "init_from starts a new run and resume continues one"),
        (["--tokenizer=tok.json"], "a fine-tuned run keeps its source's tokenizer"),
        (["--init_step=3"], "not a run directory, so it has no steps"),
    ],
)
def test_fine_tuning_refusals_are_one_line(hf_source, tmp_path, capsys, extra, says):
    code, err = sslens("train", "5M", f"--init_from={hf_source}", *TRAIN, f"--out_dir={tmp_path / 'r'}", *extra,
                       capsys=capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(says, err), err
    assert not (tmp_path / "r").exists()


def test_a_missing_source_is_one_line(tmp_path, capsys):
    code, err = sslens("train", "5M", f"--init_from={tmp_path / 'nothing'}", *TRAIN, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "not found" in err, err
