"""Sparse autoencoders: the metrics against hand computations, the architectures' maths, training on a trained tiny
run, SAELens's on-disk layout, and the one-line refusals."""

import json
import math
import subprocess
import sys
import sysconfig

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from sslens import SSLensError
from sslens.checkpoint import load_model
from sslens.cli import main
from sslens.data import Batches, tokenize
from sslens.features import sae_dir, train_saes
from sslens.runcard import run_stories
from sslens.sae import (
    SAEConfig,
    SparseAutoencoder,
    Totals,
    evaluate_sae,
    geometric_median,
    load_sae,
    read_eval,
    save_sae,
)
from sslens.sae_train import train_sae


def identity_sae(d_in: int, arch: str = "relu") -> SparseAutoencoder:
    """Latents x+ and x- (2 d_in of them) and their difference back: an exact reconstruction, at most d_in active."""
    sae = SparseAutoencoder(SAEConfig("blocks.0.hook_resid_post", d_in, 2 * d_in, arch, k=d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_totals_match_a_hand_computation():
    """Two batches, two dimensions, three latents. Squared errors 1, 0, 4 (mse 5/3); the inputs' mean is (1, 1) and
    their squared deviations sum to 2 + 2 + 0 = 4, so fvu = 5/4; active latents per token 2, 1, 0 (l0 1); l1
    (3 + 1 + 2) / 3 = 2; latent 2 never fires (dead); latents 0 and 1 fire on 1/3 and 2/3 of tokens (dense)."""
    x1, f1, xh1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, -1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    x2 = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    f2, xh2 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[2.0, 2.0], [1.0, 3.0]])
    totals = Totals(2, 3)
    totals.add(x1, f1, xh1)
    totals.add(x2, f2, xh2)
    m = totals.metrics()
    assert m["mse"] == pytest.approx(5 / 3) and m["fvu"] == pytest.approx(5 / 4)
    assert m["l0"] == pytest.approx(1.0) and m["l1"] == pytest.approx(2.0)
    assert (m["dead"], m["dense"], m["tokens"]) == (1, 2, 3)
    assert m["density"] == pytest.approx([1 / 3, 2 / 3, 0.0])


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_an_exact_sae_recovers_all_the_loss_and_a_zero_one_none(tiny_run, arch):
    """Spliced in, a perfect reconstruction leaves the model's loss unchanged (recovered 1, fvu 0); a decoder of
    zeros is the zero ablation (recovered 0, fvu 1)."""
    model = load_model(tiny_run).eval()
    _, val = run_stories(tiny_run)
    windows = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, 8)
    exact = identity_sae(model.cfg.d_model, arch)
    result = evaluate_sae(model, exact, windows, max_windows=16)
    assert result.fvu < 1e-10 and result.ce_sae == pytest.approx(result.ce_clean, abs=1e-5)
    assert result.ce_recovered == pytest.approx(1.0, abs=1e-4) and result.ce_zero > result.ce_clean + 0.5
    assert result.l0 <= model.cfg.d_model and result.tokens == 16 * model.cfg.n_ctx
    with torch.no_grad():
        exact.W_dec.zero_()
    zero = evaluate_sae(model, exact, windows, max_windows=16)
    assert zero.ce_sae == pytest.approx(zero.ce_zero, abs=1e-5) and zero.ce_recovered == pytest.approx(0.0, abs=1e-4)
    assert zero.fvu >= 1  # sum of x^2 over sum of (x - mean)^2


def test_topk_keeps_the_k_largest_pre_activations_through_a_relu():
    sae = SparseAutoencoder(SAEConfig("h", 2, 4, "topk", k=2))
    pre = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-3.0, -2.0, -1.0, 1.0]])
    assert torch.equal(sae.activate(pre), torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]]))


def test_geometric_median_of_a_point_set_with_an_outlier():
    """Four corners of a square and one far outlier: the median stays near the square, the mean does not."""
    points = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 2.0], [1.0, 1.0], [100.0, 100.0]])
    assert torch.allclose(geometric_median(points), torch.tensor([1.0, 1.0]), atol=0.05)


def test_activations_stop_after_the_hooks_block_and_cache_only_the_hook(tiny_run, monkeypatch):
    """An SAE's activations come from a forward that stops after the hook's block (no later block, no logits) and
    caches only the hooks asked for; they equal the full cache's."""
    from sslens.sae import activations

    model = load_model(tiny_run).eval()
    tokens = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    ran, cached = [], []
    model.blocks[1].register_forward_hook(lambda *a: ran.append("blocks.1"))
    real = model.run_with_cache

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        cached.append(sorted(out[1]))
        return out

    monkeypatch.setattr(model, "run_with_cache", spy)
    x = activations(model, "blocks.0.hook_resid_post", tokens)
    assert ran == [] and cached == [["blocks.0.hook_resid_post"]]
    _, cache = real(tokens)
    assert torch.allclose(x, cache["blocks.0.hook_resid_post"], atol=1e-5)
    both = activations(model, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"], tokens)
    assert torch.allclose(
        both, torch.cat([cache["blocks.1.ln2.hook_normalized"], cache["blocks.1.hook_mlp_out"]], -1), atol=1e-5
    )


def test_training_reconstructs_held_out_activations(tiny_run):
    """A TopK SAE on a trained tiny run's residual stream: unit-norm decoder rows (before folding the input scale),
    most variance explained, most of the loss recovered, few dead latents; the ReLU one trains too."""
    model = load_model(tiny_run).eval()
    train, val = run_stories(tiny_run)
    held_out = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, 8)
    cfg = SAEConfig("blocks.1.hook_resid_post", 64, 256, k=8, tokens=200_000, batch_tokens=1024, warmup_steps=20)
    sae, log = train_sae(model, Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, 8), cfg)
    norms = sae.W_dec.norm(dim=-1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)  # all one norm: 1 / the input scale
    result = evaluate_sae(model, sae, held_out, max_windows=32)
    assert result.l0 == pytest.approx(8, abs=0.01) and result.fvu < 0.2 and result.ce_recovered > 0.8
    assert result.dead < 256 // 4 and log[-1]["mse"] < log[0]["mse"] / 3
    relu_cfg = SAEConfig(cfg.hook_name, 64, 256, "relu", tokens=100_000, batch_tokens=1024, warmup_steps=20)
    relu, _ = train_sae(model, Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, 8), relu_cfg)
    relu_result = evaluate_sae(model, relu, held_out, max_windows=32)
    assert relu_result.fvu < 0.5 and relu_result.l0 < 256 / 2


def test_a_warm_start_carries_the_scaled_weights_across_a_change_of_scale(tiny_run):
    """Checkpoints' activations differ in size (a fresh model's by ~100x): the next SAE starts from the previous
    one's weights in the scaled space (E||x||^2 = d_in), where both live, not from its raw-unit weights."""
    model = load_model(tiny_run).eval()
    train, _ = run_stories(tiny_run)
    cfg = SAEConfig("blocks.1.hook_resid_post", 64, 32, k=4, tokens=512, batch_tokens=512, buffer_tokens=1024, lr=0.0)
    trained = SparseAutoencoder(cfg)
    trained.initialise(torch.randn(100, 64))
    with torch.no_grad():
        trained.b_enc.normal_()
    start = trained.rescaled(1 / 50.0)  # as saved after training on activations x 50
    sae, _ = train_sae(model, Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, 8), cfg, start)  # lr 0
    scale = 1 / float(sae.W_dec.norm(dim=-1).mean())  # this model's input scale, folded into the result
    assert scale != pytest.approx(50.0, rel=0.5)
    unfolded = sae.rescaled(scale)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(unfolded, name), getattr(trained, name), atol=1e-5), name


@pytest.mark.parametrize("stored", [False, True], ids=["streamed", "stored"])
def test_an_interrupted_training_resumes_bitwise(tiny_run, tmp_path, monkeypatch, stored):
    """Killed after its 7th step (state saved every 3), then run again: the same SAE and log as without the
    interruption, from the stream (buffer, position, generator) or from the store (order, generator)."""
    from sslens import sae_train
    from sslens.actstore import StoredActivations, activation_store

    model = load_model(tiny_run).eval()
    train, _ = run_stories(tiny_run)
    cfg = SAEConfig("blocks.1.hook_resid_post", 64, 64, k=4, tokens=10 * 256, batch_tokens=256, buffer_tokens=1024)
    cfg.dead_tokens = 512  # AuxK's dead-latent counter is part of the state too

    def source():
        windows = Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, 4)
        return (
            StoredActivations(activation_store(model, cfg.hook_name, windows, 2048, root=tmp_path), cfg)
            if stored
            else windows
        )

    whole, whole_log = train_sae(model, source(), cfg)
    real_step, calls = sae_train.train_step, []

    def dies_at_seven(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(sae_train, "train_step", dies_at_seven)
    with pytest.raises(KeyboardInterrupt):
        train_sae(model, source(), cfg, resume=tmp_path / "resume", save_every=3)
    assert json.loads((tmp_path / "resume" / "resume.json").read_text())["step"] == 6
    monkeypatch.undo()
    again, log = train_sae(model, source(), cfg, resume=tmp_path / "resume", save_every=3)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert log == whole_log
    other = SAEConfig(cfg.hook_name, 64, 64, k=4, tokens=20 * 256, batch_tokens=256, buffer_tokens=1024)
    with pytest.raises(SSLensError, match=r"unfinished SAE trained with other settings \(tokens, dead_tokens\)"):
        train_sae(model, source(), other, resume=tmp_path / "resume")


def test_an_exact_transcoder_from_hook_z_to_attn_out_recovers_all_the_loss(tiny_run):
    """attn_out = z W_O is linear, so latents z+ and z- decoded through +-W_O are exact: spliced in at hook_attn_out
    from hook_z read earlier in the same forward, nothing changes; a transcoder decoding nothing is zero ablation."""
    model = load_model(tiny_run).eval()
    _, val = run_stories(tiny_run)
    held_out = Batches(tokenize(val, model.tokenizer), model.cfg.n_ctx, 4)
    d_z, w_o = model.cfg.n_heads * model.cfg.d_head, model.blocks[1].attn.W_O.detach().flatten(0, 1)
    cfg = SAEConfig("blocks.1.attn.hook_z", d_z, 2 * d_z, "relu", hook_name_out="blocks.1.hook_attn_out", d_out=64)
    exact = SparseAutoencoder(cfg)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([torch.eye(d_z), -torch.eye(d_z)], 1))
        exact.W_dec.copy_(torch.cat([w_o, -w_o], 0))
    result = evaluate_sae(model, exact, held_out, max_windows=8)
    assert result.fvu < 1e-8 and result.ce_sae == pytest.approx(result.ce_clean, abs=1e-4)
    assert result.ce_recovered == pytest.approx(1.0, abs=1e-3) and result.ce_zero > result.ce_clean + 0.01
    nothing = evaluate_sae(model, SparseAutoencoder(cfg), held_out, max_windows=8)
    assert nothing.ce_sae == pytest.approx(nothing.ce_zero, abs=1e-5) and nothing.ce_recovered == pytest.approx(0.0)


def test_a_transcoder_learns_an_mlp(tiny_run, tmp_path):
    """Block 1's MLP, from its normalised input to its output (`hook_name_out`, `sslens sae --hook_out`), saved in
    its own directory; most of the MLP's variance and of the loss it is worth come back."""
    settings = {"d_sae": 256, "k": 8, "tokens": 300_000, "batch_tokens": 1024, "warmup_steps": 20}
    (path,) = train_saes(
        tiny_run, "blocks.1.ln2.hook_normalized", [300], out=tmp_path, name_stories=100, probes=False,
        hook_name_out="blocks.1.hook_mlp_out", **settings,
    )  # fmt: skip
    assert path == tmp_path / "saes/blocks.1.ln2.hook_normalized/topk-256-k8-to-blocks.1.hook_mlp_out/step_0000300"
    sae, result = load_sae(path), read_eval(path)
    assert sae.cfg.transcoder and sae.cfg.hook_name_out == "blocks.1.hook_mlp_out" and sae.W_dec.shape == (256, 64)
    assert result.fvu < 0.35 and result.ce_recovered > 0.6 and result.l0 == pytest.approx(8, abs=0.01)
    assert (path / "latents.csv").is_file()  # named by its input's activations, as an SAE is


def test_saved_in_saelens_layout_and_read_back(tmp_path):
    sae = identity_sae(4, "topk")
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    target = tmp_path / "sae"
    (tmp_path / ".tmp-sae-999999999").mkdir()  # what a killed writer (a process long gone) left behind
    save_sae(sae, target)
    save_sae(sae, target)  # replaced whole
    cfg = json.loads((target / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (4, 8, 4)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    weights = load_file(target / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (4, 8),
        "b_enc": (8,),
        "W_dec": (8, 4),
        "b_dec": (4,),
    }
    again = load_sae(target)
    x = torch.randn(5, 4)
    assert torch.equal(again.encode(x), sae.encode(x)) and again.cfg == sae.cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary directory left behind


def test_sslens_sae_over_checkpoints(tiny_run, tmp_path):
    """The command: an SAE per requested checkpoint, each with its evaluation beside it, the second warm-started."""
    main(
        ["sae", str(tiny_run), "--hook", "blocks.0.hook_resid_post", "--width", "128", "--k", "4"]
        + ["--tokens", "20000", "--steps", "256,300", "--name_stories", "300", "--no_probes", "--out", str(tmp_path)]
    )
    cfg = SAEConfig("blocks.0.hook_resid_post", 64, 128, k=4)
    for step in (256, 300):
        path = sae_dir(tmp_path, cfg, step)
        assert load_sae(path).cfg.step == step and read_eval(path).tokens > 0
        values, latents = pd.read_csv(path / "values.csv"), pd.read_csv(path / "latents.csv")
        assert {"theme", "topic", "style"} <= set(values["label"]) and len(latents) == 128
        assert values["auroc"].between(0.5, 1).all() and values["latent"].between(0, 127).all()
        assert values["probe_accuracy"].isna().all()  # --no_probes
        assert set(latents["slot"].dropna()) <= {"hero", "friend", "pronoun", "object", "creature", "place"}
        contexts = json.loads((path / "contexts.json").read_text())
        assert contexts and all(0 < len(c) <= 5 and "[[" in c[0]["context"] for c in contexts.values())
    family = sae_dir(tmp_path, cfg, 300).parent
    assert sorted(p.name for p in family.iterdir() if p.name.startswith(".")) == []  # resume states removed
    by_step = pd.read_csv(family / "auroc_by_step.csv")
    assert sorted(set(by_step["step"])) == [256, 300]
    for step in (256, 300):  # the table across steps is each step's values.csv
        values = pd.read_csv(sae_dir(tmp_path, cfg, step) / "values.csv")
        assert np.allclose(by_step[by_step["step"] == step]["auroc"], values["auroc"])
    matches = pd.read_csv(family / "matches.csv")
    assert len(matches) == 128 and set(matches["previous_step"]) == {256}
    assert matches["same_index_cosine"].median() > 0.5  # warm-started: most latents keep their index
    found = pd.read_csv(family / "births.csv")
    born = found.dropna(subset=["birth_step"])
    for row in born.itertuples():
        mine = (by_step["label"] == row.label) & (by_step["value"] == row.value)
        first = by_step[mine & (by_step["auroc"] >= 0.9)]["step"].min()
        assert row.birth_step == first


def test_bad_sae_settings_are_one_line(tiny_run, capsys):
    for settings, message in [
        ({"k": 128}, "k must be between 1 and the width - 1 (127), got 128"),
        ({"d_sae": 0}, "the SAE width must be positive, got 0"),
        ({"arch": "gated"}, "unknown SAE architecture 'gated'; architectures: topk, relu"),
    ]:
        with pytest.raises(SSLensError, match=message.replace("(", r"\(").replace(")", r"\)")):
            SAEConfig("h", 64, **({"d_sae": 128} | settings))
    with pytest.raises(SystemExit) as exit_:
        main(["sae", str(tiny_run), "--hook", "blocks.7.hook_resid_post"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslens: ") and "has no hook 'blocks.7.hook_resid_post'" in err and "\n" not in err
    for hook_out, message in [
        ("blocks.1.ln2.hook_normalized", "a transcoder reconstructs another hook than it reads"),
        ("blocks.1.hook_mlp_outt", "has no hook 'blocks.1.hook_mlp_outt'"),
    ]:
        with pytest.raises(SystemExit):
            main(["sae", str(tiny_run), "--hook", "blocks.1.ln2.hook_normalized", "--hook_out", hook_out])
        err = capsys.readouterr().err.strip()
        assert err.startswith("sslens: ") and message in err and "\n" not in err
    with pytest.raises(SSLensError, match="not an SAE directory"):
        load_sae(tiny_run)
    with pytest.raises(SSLensError, match="has no checkpoint at step 5"):
        train_saes(tiny_run, "blocks.0.hook_resid_post", [5])


SAELENS_SCRIPT = """
import sys
from safetensors.torch import load_file, save_file
from sae_lens import SAE

root, out = sys.argv[1], {}
inputs = load_file(f"{root}/inputs.safetensors")
for name, x in inputs.items():
    sae = SAE.load_from_disk(f"{root}/{name}", device="cpu")
    f = sae.encode(x)
    out[f"{name}.f"], out[f"{name}.x_hat"] = f.contiguous(), sae.decode(f).contiguous()
    print(name, type(sae).__name__)
from importlib.metadata import version
print("versions", f"sae_lens={version('sae-lens')},transformer_lens={version('transformer-lens')}")
save_file(out, f"{root}/saelens.safetensors")
"""


@pytest.fixture(scope="session")
def saelens_python(tmp_path_factory) -> str:
    """A virtual environment where SAELens installs (its releases pin transformer-lens < 4, ours is 4): its own
    packages first, then ours through a .pth file, so torch is reused (a constraint keeps pip from fetching
    another). Skips, saying why, where it cannot be built (no network to PyPI, say)."""
    root = tmp_path_factory.mktemp("saelens")
    python, ours = root / "venv" / "bin" / "python", sysconfig.get_paths()["purelib"]
    steps = [
        [sys.executable, "-m", "venv", str(root / "venv")],
        [str(python), "-c", f"import site; open(site.getsitepackages()[0] + '/zz_sslens.pth', 'w').write({ours!r})"],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "sae-lens", "-c", str(root / "c")],
    ]
    (root / "c").write_text(f"torch=={torch.__version__}\n")
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
            pytest.skip(f"no environment with SAELens could be built here ({' '.join(step[1:4])}: {why})")
    return str(python)


@pytest.mark.slow
def test_saelens_reads_our_files_and_computes_what_we_do(saelens_python, tmp_path):
    """SAELens's own loader on our directories (TopK; ReLU, its "standard"; a hook_z SAE, which it reshapes per
    head; a ReLU transcoder, its "transcoder", whose b_dec is in the output space), with a nonzero encoder bias and a decoder off unit norm (as saved after folding the input scale): its
    encode and decode equal ours."""
    gen = torch.Generator().manual_seed(0)
    cases = {
        "topk": ("blocks.1.hook_resid_post", "topk", (64,)),
        "relu": ("blocks.1.hook_mlp_out", "relu", (64,)),
        "hook_z": ("blocks.0.attn.hook_z", "topk", (4, 16)),
        "transcoder": ("blocks.1.ln2.hook_normalized", "relu", (64,)),  # to hook_mlp_out, 48 wide here
    }
    inputs, ours = {}, {}
    for name, (hook, arch, shape) in cases.items():
        x = torch.randn(32, math.prod(shape), generator=gen) * 3
        out = {"hook_name_out": "blocks.1.hook_mlp_out", "d_out": 48} if name == "transcoder" else {}
        sae = SparseAutoencoder(SAEConfig(hook, x.shape[1], 256, arch, k=8, model_name="tiny", **out))
        sae.initialise(torch.cat([x, torch.randn(32, 48, generator=gen)], 1) if out else x)
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(256, generator=gen) * 0.1)
        sae = sae.rescaled(0.5)
        save_sae(sae, tmp_path / name)
        inputs[name], ours[name] = x.view(32, *shape), (sae.encode(x), sae(x).view(32, *(shape if not out else (48,))))
    save_file(inputs, tmp_path / "inputs.safetensors")
    done = subprocess.run(
        [saelens_python, "-c", SAELENS_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.split()
    print(printed[-1])  # the versions, for the log
    assert dict(zip(printed[::2], printed[1::2])) == {
        "topk": "TopKSAE",
        "relu": "StandardSAE",
        "hook_z": "TopKSAE",
        "transcoder": "Transcoder",
        "versions": printed[-1],
    }
    theirs = load_file(tmp_path / "saelens.safetensors")
    for name, (f, x_hat) in ours.items():
        assert (f > 0).sum() > 0
        assert torch.allclose(theirs[f"{name}.f"], f, atol=1e-5), name
        assert torch.allclose(theirs[f"{name}.x_hat"], x_hat, atol=1e-5), name
