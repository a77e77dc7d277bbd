"""Tuned lenses: an untrained one is the logit lens, the translators' maths by hand, the evaluation's last layer is
the model itself, a trained lens reads every layer before the last better than the logit lens, and bad input is
one line."""

import pandas as pd
import pytest
import torch

from sslens import SSLensError
from sslens.checkpoint import load_model
from sslens.cli import main
from sslens.data import Batches, tokenize
from sslens.lens import TunedLens, logit_lens
from sslens.runcard import run_stories
from sslens.tuned_lens import EVAL_FILE, evaluate_lenses, lens_dir, load_tuned_lens, save_tuned_lens


def test_an_untrained_tuned_lens_is_the_logit_lens_and_translators_are_affine(tiny_run):
    model = load_model(tiny_run).eval()
    tokens = torch.tensor(model.tokenizer.encode("once upon a time there was a fox", add_special_tokens=False).ids)
    plain, untrained = logit_lens(model, tokens), logit_lens(model, tokens, tuned=TunedLens(2, 64))
    assert torch.equal(plain.top_tokens, untrained.top_tokens) and torch.equal(plain.top_probs, untrained.top_probs)
    lens = TunedLens(2, 64)
    with torch.no_grad():
        lens.A.normal_(), lens.b.normal_()
    resid = torch.randn(3, 5, 64)
    out = lens(resid)
    for layer in range(2):
        assert torch.allclose(out[layer], resid[layer] + resid[layer] @ lens.A[layer] + lens.b[layer], atol=1e-5)
    assert torch.equal(out[2], resid[2])  # the last residual is the model's own output: never translated


def test_the_evaluations_last_layer_is_the_model_itself(tiny_run):
    model = load_model(tiny_run).eval()
    _, val = run_stories(tiny_run)
    windows = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, 2)
    table = evaluate_lenses(model, TunedLens(2, 64), windows, max_windows=4).set_index(["lens", "layer"])
    rows = windows.windows(range(4))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    for lens in ("logit", "tuned"):
        assert table.loc[(lens, "blocks.1"), "kl"] == pytest.approx(0, abs=1e-6)
        assert table.loc[(lens, "blocks.1"), "ce"] == pytest.approx(float(ce), rel=1e-4)
    assert (table.loc["logit"] == table.loc["tuned"]).all().all()  # an untrained lens changes nothing
    assert table.loc[("logit", "embed"), "kl"] > table.loc[("logit", "blocks.0"), "kl"] > 0


def test_a_trained_lens_reads_every_layer_before_the_last_better(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    main(["lens", "train", str(run), "--step", "300", "--tokens", "60000"])
    printed = capsys.readouterr().out
    assert "| layer | KL logit | KL tuned | CE logit | CE tuned |" in printed
    table = pd.read_csv(lens_dir(run, 300) / EVAL_FILE)
    assert list(table.columns) == ["layer", "lens", "kl", "ce"] and set(table["lens"]) == {"logit", "tuned"}
    wide = table.pivot(index="layer", columns="lens", values=["kl", "ce"])
    for layer in ("embed", "blocks.0"):
        assert wide.loc[layer, ("kl", "tuned")] < wide.loc[layer, ("kl", "logit")], layer
        assert wide.loc[layer, ("ce", "tuned")] < wide.loc[layer, ("ce", "logit")], layer
    assert "plotly" in (lens_dir(run, 300) / "lens_eval.html").read_text()[:200_000]
    lens = load_tuned_lens(lens_dir(run, 300), load_model(run, 300))
    assert lens.A.abs().sum() > 0


def test_bad_lens_input_is_one_line(tiny_run, tmp_path, capsys):
    from sslens.config import ModelConfig
    from sslens.model import HookedLlama

    model = load_model(tiny_run)
    lens = TunedLens(2, 64)
    save_tuned_lens(lens, tmp_path / "lens", pd.DataFrame({"layer": [], "lens": [], "kl": [], "ce": []}), {})
    other = HookedLlama(ModelConfig(3, 64, 4, 2, 128, d_vocab=1024, n_ctx=64))
    with pytest.raises(SSLensError, match=r"trained for another model shape \(\(2, 64, 64\)\); this model needs"):
        load_tuned_lens(tmp_path / "lens", other)
    data = (tmp_path / "lens" / "tuned_lens.safetensors").read_bytes()
    (tmp_path / "lens" / "tuned_lens.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SSLensError, match="is unreadable \\(truncated or damaged"):
        load_tuned_lens(tmp_path / "lens", model)
    with pytest.raises(SSLensError, match="holds no tuned lens"):
        load_tuned_lens(tmp_path, model)
    model.save_hf(tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_:
        main(["lens", "train", str(tmp_path / "hf"), "--steps", "all"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "is not a run directory with checkpoints" in err and "\n" not in err
