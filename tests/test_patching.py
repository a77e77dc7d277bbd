"""sslens.patching against TransformerLens's own patching functions (one forward per patch) on the same model and
pairs, and attribution patching against activation patching where the first-order estimate is exact."""

import itertools
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl

from sslens import load_model, pairs, synth
from sslens.cli import main
from sslens.errors import SSLensError
from sslens.patching import ROLES, SWEEPS, LogitDiff, PairBatch, attribute_hooks, pair_batch, patch_hooks, sweep
from sslens.tokenizer import train_tokenizer

# our sweep -> (TransformerLens's function, how to lay our axes out as its)
TL_SWEEPS = {
    "resid_pre": (tl.get_act_patch_resid_pre, lambda v: v),
    "resid_mid": (tl.get_act_patch_resid_mid, lambda v: v),
    "attn_out": (tl.get_act_patch_attn_out, lambda v: v),
    "mlp_out": (tl.get_act_patch_mlp_out, lambda v: v),
    "heads": (tl.get_act_patch_attn_head_out_all_pos, lambda v: v),
    "heads_by_pos": (tl.get_act_patch_attn_head_out_by_pos, lambda v: v.permute(0, 2, 1)),  # layer pos head
    "patterns": (tl.get_act_patch_attn_head_pattern_all_pos, lambda v: v),
    "patterns_by_pos": (tl.get_act_patch_attn_head_pattern_by_pos, lambda v: v),  # layer head dest_pos
}
LENGTH = 20


@pytest.fixture(scope="module")
def batch(tiny_run):
    """The trained tiny model and three name pairs, each cut to its last LENGTH tokens (still one mention apart)."""
    model = load_model(tiny_run).eval()
    rows = [
        r
        for r in pairs.pairs("name", 60, seed=1, tokenizer=model.tokenizer)
        if len(r["clean_tokens"]) >= LENGTH and r["positions"][0] >= len(r["clean_tokens"]) - LENGTH
    ][:3]
    assert len(rows) == 3
    clean = torch.tensor([r["clean_tokens"][-LENGTH:] for r in rows])
    corrupt = torch.tensor([r["corrupt_tokens"][-LENGTH:] for r in rows])
    metric = LogitDiff([r["clean_answer"] for r in rows], [r["corrupt_answer"] for r in rows])
    return model, clean, corrupt, metric


@pytest.mark.parametrize("name", sorted(TL_SWEEPS))
def test_each_sweep_equals_transformer_lens(batch, name):
    model, clean, corrupt, metric = batch
    ours = sweep(model, clean, corrupt, metric, name)
    tl_sweep, layout = TL_SWEEPS[name]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    theirs = tl_sweep(model, corrupt, cache, lambda logits: metric(logits).mean())
    assert ours.values.abs().max() > 0.05, "some patch restores something"
    # compared as the metric itself (a logit difference), before normalising, so fp32 noise is not magnified
    patched = ours.values * (ours.clean_metric - ours.corrupt_metric) + ours.corrupt_metric
    torch.testing.assert_close(layout(patched), theirs, atol=1e-4, rtol=1e-4)
    assert ours.axes[0] == "layer" and ours.values.shape == tuple(len(ours.labels[a]) for a in ours.axes)


def test_resid_post_is_the_next_blocks_resid_pre(batch):
    model, clean, corrupt, metric = batch
    post, pre = (sweep(model, clean, corrupt, metric, name).values for name in ("resid_post", "resid_pre"))
    torch.testing.assert_close(post[:-1], pre[1:], atol=1e-5, rtol=1e-5)


class LastPositionLogits:
    """A linear metric of the last position's logits alone, marked so the sweeps unembed only that position: each
    pair's logits projected on its clean - corrupt difference there, less the corrupt run's (0 when corrupt)."""

    last_position_only = True

    def __init__(self, model, clean, corrupt):
        with torch.no_grad():
            self.offset = model(corrupt)[:, -1]
            self.direction = model(clean)[:, -1] - self.offset

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return ((logits[:, -1].float() - self.offset) * self.direction).sum(-1)


@pytest.mark.parametrize("reads", ["every position", "the last position"])
def test_attribution_is_exact_where_the_metric_is_linear_in_the_activation(batch, reads):
    """Logits are linear in the final norm's output, so there the first-order estimate is the patched value. One
    metric reads every position (a logit difference summed over them), so every position's patch counts; the other
    reads the last position alone and says so, so the sweeps unembed only that one (the norm's hook still sees every
    position) and only the last position's patch restores anything, all of it."""
    model, clean, corrupt, _ = batch
    if reads == "every position":
        metric = lambda logits: (logits[..., 5] - logits[..., 7]).sum(-1)  # noqa: E731
    else:
        metric = LastPositionLogits(model, clean, corrupt)
    where = (["ln_final.hook_normalized"], ("pos", "d_model"), ("pos",))
    patched, hi, lo = patch_hooks(model, PairBatch(clean, corrupt, metric), *where)
    estimate, _, _ = attribute_hooks(model, PairBatch(clean, corrupt, metric), *where)
    assert (patched - lo).abs().max() > 0.1
    torch.testing.assert_close(estimate + lo, patched, atol=1e-4, rtol=1e-4)
    if reads == "the last position":
        assert (patched[0, :-1] - lo).abs().max() < 1e-4 and abs(patched[0, -1] - hi) < 1e-4


@pytest.mark.parametrize("name", ["resid_pre", "heads_by_pos", "patterns_by_pos"])
def test_attribution_sweeps_lay_out_as_the_activation_sweeps(batch, name):
    """How well the estimate agrees on a real model is measured, not asserted (`sslens bench`, notebook 04); here:
    the same grid, and at the final norm exactly the activation result (test above)."""
    model, clean, corrupt, metric = batch
    act, attr = (sweep(model, clean, corrupt, metric, name, method) for method in ("activation", "attribution"))
    assert attr.values.shape == act.values.shape and attr.axes == act.axes and attr.labels == act.labels
    assert attr.method == "attribution" and attr.values.abs().max() > 0


def test_results_name_their_axes_and_draw(batch):
    model, clean, corrupt, metric = batch
    result = sweep(model, clean, corrupt, metric, "heads_by_pos")
    assert result.axes == ("layer", "head", "pos")
    assert result.labels["pos"][0].startswith("0: ") and result.labels["head"][-1] == f"H{model.cfg.n_heads - 1}"
    frame = result.frame()
    assert len(frame) == result.values.numel() and list(frame.columns) == ["layer", "head", "pos", "effect", "restored"]
    fig = result.figure()
    assert fig.data[0].z.shape == (model.cfg.n_layers, model.cfg.n_heads * LENGTH)


def test_bad_sweeps_and_pairs_are_one_line(batch):
    model, clean, corrupt, metric = batch
    with pytest.raises(SSLensError, match="sweeps: " + ", ".join(SWEEPS)):
        sweep(model, clean, corrupt, metric, "neurons")
    with pytest.raises(SSLensError, match="one shape"):
        sweep(model, clean, corrupt[:, 1:], metric)
    with pytest.raises(SSLensError, match="nothing to restore"):
        sweep(model, clean, clean, metric)


@pytest.mark.parametrize("name", ["resid_pre", "heads_by_pos"])
def test_pairs_of_different_lengths_patch_by_role_as_one_pair_at_a_time(tiny_run, name):
    """Left-padded pairs, patched by role in one batch, equal a plain loop: each pair alone, one forward per patch,
    a hook copying the clean activation at that role's positions."""
    model = load_model(tiny_run).eval()
    rows = [r for r in pairs.pairs("name", 12, seed=4, tokenizer=model.tokenizer) if len(r["clean_tokens"]) <= 60][:3]
    assert len({len(r["clean_tokens"]) for r in rows}) > 1, "lengths differ, so the batch is padded"
    result = sweep(model, **vars(pair_batch(model, rows)), name=name)
    assert result.axes[-1] == "role" and result.labels["role"] == list(ROLES)

    hook = "hook_resid_pre" if name == "resid_pre" else "attn.hook_z"
    heads = range(model.cfg.n_heads) if name == "heads_by_pos" else [None]
    expected = torch.zeros(result.values.shape)
    clean_m, corrupt_m, patched = 0.0, 0.0, {}
    for r in rows:
        clean, corrupt = torch.tensor([r["clean_tokens"]]), torch.tensor([r["corrupt_tokens"]])
        metric = LogitDiff([r["clean_answer"]], [r["corrupt_answer"]])
        roles = pair_batch(model, [r]).roles
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(clean)
            clean_m += metric(clean_logits).item() / len(rows)
            corrupt_m += metric(model(corrupt)).item() / len(rows)
            for layer, head, (i, role) in itertools.product(range(model.cfg.n_layers), heads, enumerate(ROLES)):
                at = roles[role][0]
                where = (slice(None), at) if head is None else (slice(None), at, head)

                def copy(act, hook, where=where, cache=cache):
                    act = act.clone()
                    act[where] = cache[hook.name][where]
                    return act

                logits = model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.{hook}", copy)])
                key = (layer, i) if head is None else (layer, head, i)
                patched[key] = patched.get(key, 0.0) + metric(logits).item() / len(rows)
    for key, value in patched.items():
        expected[key] = (value - corrupt_m) / (clean_m - corrupt_m)
    torch.testing.assert_close(result.values, expected, atol=1e-4, rtol=1e-4)


def test_sslens_patch_writes_results_across_checkpoints_and_reads_a_pairs_file(tiny_run, tmp_path, capsys):
    """The command as a user runs it (a subprocess), then in-process for the rest (quicker): a pairs file gives the
    same results as the pairs it holds, and one made under another tokenizer is refused in one line."""
    out = tmp_path / "patch"
    done = subprocess.run(
        [sys.executable, "-m", "sslens", "patch", str(tiny_run), "--n", "4", "--steps", "64,300", "--sweep", "resid"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "results.csv")
    assert set(table["step"]) == {64, 300} and set(table["sweep"]) == {"resid_pre", "resid_mid", "resid_post"}
    assert set(table["role"]) == set(ROLES) and len(table) == 2 * 3 * 2 * len(ROLES)  # steps, sweeps, layers, roles
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["factor"] == "name" and len(saved["results"]) == 6
    assert "plotly" in (out / "index.html").read_text() and "resid_pre" in done.stdout

    pairs_file, again = str(tmp_path / "p.parquet"), tmp_path / "again"
    main(["data", "pairs", "--factor", "name", "--n", "4", "--tokenizer", str(tiny_run), "--out", pairs_file])
    main(["patch", str(tiny_run), "--pairs", pairs_file, "--step", "300", "--sweep", "resid", "--out", str(again)])
    pd.testing.assert_frame_equal(
        pd.read_csv(again / "results.csv"), table[table["step"] == 300].reset_index(drop=True)
    )

    other = tmp_path / "other.json"
    other.write_text(train_tokenizer([synth.story(9, i)["story"] for i in range(200)], vocab_size=600).to_str())
    main(["data", "pairs", "--factor", "name", "--n", "2", "--tokenizer", str(other), "--out", str(tmp_path / "o.pq")])
    capsys.readouterr()
    for args, message in [
        (["--pairs", str(tmp_path / "o.pq")], "another tokenizer"),
        (["--factor", "theme"], "slot factor"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(["patch", str(tiny_run), *args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and err.count("\n") == 1
