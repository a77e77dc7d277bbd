"""Metadata probes: the torch probe against scikit-learn, the harvest against run_with_cache, and the protocol on a
trained run."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from sslens import SSLensError, load_model
from sslens.probe import (
    C_GRID,
    accuracy_figure,
    control_labels,
    fit,
    harvest,
    load_labelled,
    logistic_regression,
    probe_features,
    probe_steps,
    resolve_hooks,
    split,
    story_tokens,
    story_type,
)


def sslens(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "sslens", *args], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_logistic_regression_is_scikit_learns(C):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=gen)
    y = torch.randint(0, 5, (400,), generator=gen)
    x = centres[y] + 1.5 * torch.randn(400, 8, generator=gen)
    w = logistic_regression(x, y, 5, C, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ w[:-1] + w[-1], -1).numpy()
    np.testing.assert_allclose(ours, oracle.predict_proba(x.numpy()), atol=2e-3)


def scaled_blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four overlapping classes in six features of very different scales (so standardising matters)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = (rng.normal(size=(4, 6))[y] + 1.2 * rng.normal(size=(n, 6))) * np.array([1, 30, 0.03, 1, 8, 1])
    return x, np.array([f"class{i}" for i in y])


def test_fit_standardises_and_chooses_C_on_validation_as_scikit_learn_would():
    x, labels = scaled_blobs()
    train, val, test = split(list(labels))
    accuracy, macro_f1, C = fit(x, labels, train, val, test)
    xs = StandardScaler().fit(x[train]).transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracles = {c: LogisticRegression(C=c, tol=1e-8, max_iter=5000).fit(xs[train], labels[train]) for c in C_GRID}
    val_scores = {c: (clf.predict(xs[val]) == labels[val]).mean() for c, clf in oracles.items()}
    assert val_scores[C] >= max(val_scores.values()) - 1 / len(val)  # the C validation picks, up to one story
    predicted = oracles[C].predict(xs[test])
    assert accuracy == pytest.approx((predicted == labels[test]).mean(), abs=1 / len(test) + 1e-9)
    assert macro_f1 == pytest.approx(f1_score(labels[test], predicted, average="macro"), abs=0.02)


def test_probe_report_against_hand_counts():
    x, labels = scaled_blobs(400, seed=1)
    stories = [
        f"{w} story {i}" for i, w in enumerate(np.random.default_rng(2).choice(["once", "the", "tom", "a"], 400))
    ]
    (result,) = probe_features({"hook_embed": x}, stories, list(labels), step=7)
    train, val, test = split(list(labels))
    most_common = max(set(labels[train]), key=list(labels[train]).count)
    assert result.majority == pytest.approx((labels[test] == most_common).mean())
    assert result.selectivity == pytest.approx(result.accuracy - result.control_accuracy)
    assert (result.n_train, result.n_test, result.n_classes, result.step) == (len(train), len(test), 4, 7)
    assert result.accuracy == fit(x, labels, train, val, test)[0]
    control = np.asarray(control_labels(stories, list(labels), train))
    assert result.control_accuracy == fit(x, control, train, val, test)[0]
    assert result.accuracy > 2 * result.majority  # the classes are separable enough to show it


def test_harvest_equals_each_story_run_alone(tiny_run, tmp_path):
    model = load_model(tiny_run)
    stories, _ = load_labelled("synth:2000", "theme", max_stories=5)
    tokens = story_tokens(model, ["Tom ran home.", *stories, "The small cat sat by the door and looked at the rain."])
    assert len({len(t) for t in tokens}) > 1 and max(map(len, tokens)) == model.cfg.n_ctx  # padding and truncation
    hooks = resolve_hooks(model, ["hook_embed", "blocks.0.*resid_post", "blocks.1.attn.hook_z"])
    assert hooks == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    for pool in ("mean", "last"):
        got = harvest(model, tokens, hooks, pool, batch_size=3)
        spilled = harvest(model, tokens, hooks, pool, batch_size=4, spill_dir=tmp_path)
        for i, ids in enumerate(tokens):
            _, cache = model.run_with_cache(torch.tensor([ids]))
            for hook in hooks:
                act = cache[hook][0].flatten(1)
                expected = act.mean(0) if pool == "mean" else act[-1]
                np.testing.assert_allclose(got[hook][i], expected.detach().numpy(), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(spilled[hook][i], got[hook][i], rtol=1e-5, atol=1e-5)
        assert isinstance(spilled[hooks[0]], np.memmap) and (tmp_path / "hook_embed.npy").is_file()
    # Only the layers needed are run: a harvest of the embedding alone must not reach block 0.
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    harvest(model, tokens, ["hook_embed"])
    handle.remove()
    assert calls == []


def test_control_task_labels_are_per_story_type():
    stories = ["Once upon a time.", "once, there was", "The end.", "Then it rained", "The cat"] * 20
    labels = [str(i % 3) for i in range(len(stories))]
    train, val, test = split(labels)
    assert sorted([*train, *val, *test]) == list(range(len(stories))) and len(test) == 20
    control = control_labels(stories, labels, train)
    by_type = {}
    for story, c in zip(stories, control):
        by_type.setdefault(story_type(story), set()).add(c)
    assert set(by_type) == {"once", "the", "then"} and all(len(v) == 1 for v in by_type.values())
    assert set(control) <= set(labels)
    rare = ["x"] * 3 + labels[3:]  # too few of one label to stratify: a plain random split
    assert sum(map(len, split(rare))) == len(rare)


def test_theme_probe_on_a_trained_run(tiny_run, tmp_path):
    """The protocol on the embedded corpus: the mean-pooled embedding (a bag of words) decodes theme far above the
    majority baseline and above its control task; at step 0 no block decodes more than the token embedding alone.
    (Not "as much": at initialisation the pre-norm blocks add random mixing of about the embedding's size.) Since
    stories carry made-up names and chants, the tiny run's mean-pooled blocks are no longer selective for theme
    (0.19 against a control of 0.18 at step 300; the embedding 0.28 against 0.09), and whether they beat their
    step-0 value depends on the run's tokenizer (0.22 against 0.19 in one run), so selectivity is asserted where
    it holds."""
    stories, labels = load_labelled("synth:2000", "theme")
    results = probe_steps(tiny_run, [0, 300], stories, labels)
    by_step = {s: {r.hook: r for r in results if r.step == s} for s in (0, 300)}
    embed = by_step[300]["hook_embed"]
    assert embed.accuracy > 5 * embed.majority and embed.accuracy > embed.control_accuracy + 0.1
    at_init = by_step[0]
    embed = at_init["hook_embed"].accuracy
    assert all(r.accuracy <= embed + 0.05 for h, r in at_init.items() if h.startswith("blocks."))
    assert {r.n_classes for r in results} == {len(set(labels))} and all(r.n_train + r.n_test < 2000 for r in results)


def test_probe_command(tiny_run, tmp_path):
    out = tmp_path / "out"
    done = sslens(
        "probe",
        str(tiny_run),
        "--label",
        "style",
        "--steps",
        "0,300",
        "--max_stories",
        "400",
        "--hooks",
        "blocks.*.hook_resid_post",
        "--pool",
        "last",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("hook,step,accuracy") and len(rows) == 1 + 2 * 2
    meta = json.loads((out / "results.json").read_text())
    assert (
        meta["data"] == "synth:2000" and meta["label"] == "style" and meta["pool"] == "last" and meta["stories"] == 400
    )
    assert [r["step"] for r in meta["results"]] == [0, 0, 300, 300]
    assert "blocks.1.hook_resid_post" in done.stdout and "plotly" in (out / "accuracy.html").read_text()[:100_000]


def test_probe_every_checkpoint(tiny_run, tmp_path):
    """--steps all: one row per checkpoint and hook, and a figure with one line per hook over the steps."""
    from sslens.checkpoint import saved_steps
    from sslens.probe import ProbeResult

    out = tmp_path / "out"
    done = sslens(
        "probe",
        str(tiny_run),
        "--label",
        "theme",
        "--steps",
        "all",
        "--max_stories",
        "200",
        "--hooks",
        "blocks.*.hook_resid_post",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    steps, hooks = saved_steps(tiny_run), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    results = [ProbeResult(**r) for r in json.loads((out / "results.json").read_text())["results"]]
    assert [(r.step, r.hook) for r in results] == [(s, h) for s in steps for h in hooks]
    lines = accuracy_figure(results).data
    assert [t.name for t in lines] == [*hooks, "majority class", "control task (best hook)"]
    assert list(lines[1].x) == [str(s) for s in steps]
    assert list(lines[1].y) == [r.accuracy for r in results if r.hook == hooks[1]]
    assert all(h in (out / "accuracy.html").read_text() for h in hooks)
    assert "checkpoints" in done.stderr  # the progress bar over checkpoints


@pytest.mark.parametrize(
    "args, message",
    [
        (["--label", "colour"], "has no label column 'colour'; its columns: topic, theme"),
        (["--label", "theme", "--hooks", "blocks.9.*"], "no hook matches blocks.9.*"),
        (["--label", "theme", "--hooks", "blocks.0.attn.hook_pattern"], "not one vector per token"),
        (["--label", "theme", "--steps", "last"], "--steps takes 'all' or step numbers"),
        (["--label", "theme", "--steps", "3"], "no checkpoint at step 3"),
        (["--label", "theme", "--data", "missing.parquet"], "data path missing.parquet not found"),
        (["--label", "theme", "--batch_size", "0"], "batch_size must be at least 1, not 0"),
        (["--label", "theme", "--max_stories", "-3"], "max_stories must be at least 5, not -3"),
    ],
)
def test_probe_refusals(tiny_run, args, message):
    done = sslens("probe", str(tiny_run), "--max_stories", "50", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_probe_needs_data_for_a_model_outside_a_run(tmp_path):
    from sslens import HookedLlama

    HookedLlama.from_preset("1.25M").save_hf(tmp_path / "hf")
    done = sslens("probe", str(tmp_path / "hf"), "--label", "theme")
    assert done.returncode == 2 and "name the labelled stories with --data" in done.stderr


def test_too_few_stories_for_the_split_are_refused_before_any_model_work(tmp_path):
    """60/20/20 needs 5 stories (3 to fit, 1 to choose C, 1 to test): fewer is refused by load_labelled, before a
    model is loaded, whether max_stories asks for fewer or the data holds fewer; probe_features refuses the same."""
    with pytest.raises(
        SSLensError,
        match="max_stories must be at least 5, not 2: the stories are split 60/20/20 into "
        "train, validation and test, which needs 3 to fit the probe, 1 to choose C",
    ):
        load_labelled("synth:300", "theme", max_stories=2)
    (tmp_path / "four.jsonl").write_text(
        "".join(json.dumps({"story": f"story {i}", "theme": "ab"[i % 2]}) + "\n" for i in range(4))
    )
    with pytest.raises(
        SSLensError,
        match=r"^4 labelled stories are too few: the 60/20/20 train/validation/test split "
        r"needs at least 5 \(3 to fit the probe, 1 to choose C, 1 to test\)",
    ):
        load_labelled(tmp_path / "four.jsonl", "theme")
    with pytest.raises(SSLensError, match="4 labelled stories are too few"):
        probe_features({"hook_embed": np.zeros((4, 3), np.float32)}, ["a b"] * 4, list("abab"))
    stories, labels = load_labelled("synth:300", "theme", max_stories=5)
    assert (
        len(
            probe_features(
                {"hook_embed": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)}, stories, labels
            )
        )
        == 1
    )  # the smallest count that is accepted does fit and score
