"""Latents named by story metadata: AUROC against scikit-learn, a planted latent found, pooling over left-padded
stories equal to one story at a time, token slots from the generator's cast, the probe beside each value equal to
`sslens probe`'s, peak histograms by hand."""

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sslens import SSLensError, synth
from sslens.checkpoint import load_model
from sslens.features import (
    SLOTS,
    StoryActivations,
    auroc,
    latent_table,
    peak_histograms,
    slot_table,
    story_activations,
    token_slots,
    top_contexts,
    value_table,
)
from sslens.runcard import run_stories
from sslens.sae import SAEConfig, SparseAutoencoder, activations


def test_auroc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(60, 5)).astype(np.float32)  # few distinct values: many ties
    positive = np.stack([rng.random(60) < p for p in (0.1, 0.5, 0.8)])
    ours = auroc(scores, positive)
    for v in range(3):
        for latent in range(5):
            assert ours[v, latent] == pytest.approx(roc_auc_score(positive[v], scores[:, latent]))


def test_a_planted_latent_is_found_and_named():
    """Latent 2 fires on exactly the stories about "courage"; values held by too few stories, or by none, are left
    out."""
    rng = np.random.default_rng(1)
    theme = ["courage"] * 10 + ["kindness"] * 10 + ["rare"] * 2
    persona = [""] * 22
    acts = rng.random((22, 4)).astype(np.float32) * 0.5
    acts[:10, 2] += 1.0
    story = StoryActivations(acts, acts / 2, np.zeros(acts.shape, np.int32), [[1]] * 22)
    values = value_table(story, {"theme": theme, "persona": persona})
    assert list(values["value"]) == ["courage", "kindness"] or list(values["value"]) == ["kindness", "courage"]
    row = values.set_index("value").loc["courage"]
    assert (row["latent"], row["auroc"], row["precision"], row["stories"]) == (2, 1.0, 1.0, 10)
    latents = latent_table(story, {"theme": theme})
    assert latents.loc[2, "value"] == "courage" and latents.loc[2, "auroc"] == 1.0
    with pytest.raises(SSLensError, match="no label value is held by at least 5"):
        value_table(story, {"persona": persona})


def test_story_pooling_over_padded_batches_equals_one_story_at_a_time(tiny_run):
    model = load_model(tiny_run).eval()
    _, val = run_stories(tiny_run)
    stories = list(val["story"][:6])
    sae = SparseAutoencoder(SAEConfig("blocks.1.hook_resid_post", 64, 96, k=6))
    sae.initialise(torch.randn(50, 64))
    pooled = story_activations(model, sae, stories, batch_size=4)
    for i, story in enumerate(stories):
        ids = torch.tensor([model.tokenizer.encode(story, add_special_tokens=False).ids[: model.cfg.n_ctx]])
        with torch.no_grad():
            x = activations(model, sae.cfg.hook_name, ids)[0]
            f = sae.encode(x)
        assert np.allclose(pooled.inputs[i], x.mean(0).numpy(), atol=1e-4)  # what the probes beside it fit on
        assert np.allclose(pooled.max[i], f.amax(0).numpy(), atol=1e-4)
        assert np.allclose(pooled.mean[i], f.mean(0).numpy(), atol=1e-4)
        at_argmax = f[torch.from_numpy(pooled.argmax[i]).long(), torch.arange(96)]  # where the batch found the max
        assert np.allclose(at_argmax.numpy(), f.amax(0).numpy(), atol=1e-4)
    latent = int(pooled.max.max(0).argmax())
    contexts = top_contexts(pooled, model.tokenizer, latent, n=4)
    assert 0 < len(contexts) <= 4 and [c["activation"] for c in contexts] == sorted(
        (c["activation"] for c in contexts), reverse=True
    )
    for c in contexts:
        token = model.tokenizer.id_to_token(pooled.tokens[c["story"]][c["position"]])
        assert f"[[{token}]]" in c["context"] and c["activation"] == pytest.approx(pooled.max[c["story"], latent])


def test_stories_without_labels_are_noted_and_nothing_is_written(tiny_run, tmp_path, capsys):
    import datasets

    from sslens.features import name_latents

    model = load_model(tiny_run).eval()
    sae = SparseAutoencoder(SAEConfig("blocks.1.hook_resid_post", 64, 96, k=6))
    name_latents(model, sae, datasets.Dataset.from_dict({"story": ["a cat sat.", "a dog ran."]}), tmp_path)
    assert capsys.readouterr().out.strip().startswith("sslens: note: no label (theme, topic")
    assert list(tmp_path.iterdir()) == []


def test_token_slots_mark_the_words_the_generator_filled_in(tiny_run):
    model = load_model(tiny_run)
    tok = model.tokenizer
    for index in range(20):
        row = synth.story(7, index)
        cast = synth.story_cast(row["generation_id"])
        slots = token_slots(tok, row["story"], cast, n_ctx=10_000)
        encoding = tok.encode(row["story"], add_special_tokens=False)
        assert len(slots) == len(encoding.ids)
        for s, slot in enumerate(SLOTS, 1):
            runs = np.split(np.flatnonzero(slots == s), np.flatnonzero(np.diff(np.flatnonzero(slots == s)) > 1) + 1)
            spans = {row["story"][encoding.offsets[r[0]][0] : encoding.offsets[r[-1]][1]] for r in runs if len(r)}
            words = {
                "hero": {cast["hero"]},
                "friend": {cast["friend"]},
                "pronoun": {cast[k] for k in ("he", "him", "his", "He", "His")},
                "object": {cast["thing"][4:]},
                "creature": {cast["creature"][4:]},
                "place": {cast["place"][4:]},
            }[slot]
            assert spans <= words, (slot, spans, words)
            mentioned = {w for w in words if re.search(rf"\b{re.escape(w)}\b", row["story"])}
            assert spans == mentioned, (slot, spans, mentioned)  # every word of the slot the story uses is marked
        assert (slots == 1).any()  # every story names its hero
    assert (token_slots(tok, row["story"], cast, n_ctx=5) == slots[:5]).all()


def test_slot_sums_over_padded_batches_equal_one_story_at_a_time(tiny_run):
    model = load_model(tiny_run).eval()
    rows = [synth.story(3, i) for i in range(5)]
    stories = [r["story"] for r in rows]
    slots = [token_slots(model.tokenizer, r["story"], synth.story_cast(r["generation_id"]), 128) for r in rows]
    sae = SparseAutoencoder(SAEConfig("blocks.1.hook_resid_post", 64, 32, k=4))
    sae.initialise(torch.randn(50, 64))
    pooled = story_activations(model, sae, stories, batch_size=2, slots=slots)
    mass, counts = np.zeros((len(SLOTS) + 1, 32)), np.zeros(len(SLOTS) + 1, int)
    for story, slot in zip(stories, slots):
        ids = torch.tensor([model.tokenizer.encode(story, add_special_tokens=False).ids[:128]])
        with torch.no_grad():
            f = sae.encode(activations(model, sae.cfg.hook_name, ids))[0].double().numpy()
        for s in range(len(SLOTS) + 1):
            mass[s] += f[slot == s].sum(0)
            counts[s] += (slot == s).sum()
    assert np.allclose(pooled.slot_mass, mass, atol=1e-3) and (pooled.slot_tokens == counts).all()


def test_a_latent_on_hero_names_is_given_that_slot_with_its_lift():
    mass = np.zeros((len(SLOTS) + 1, 3))
    mass[1, 0] = 4.0  # latent 0: only on the hero's name
    mass[:, 1] = [6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # latent 1: everywhere, as the tokens are
    counts = np.array([60, 10, 10, 10, 10, 10, 10])
    acts = StoryActivations(
        np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 3), int), [[1]], slot_mass=mass, slot_tokens=counts
    )
    table = slot_table(acts)
    assert list(table["slot"]) == ["hero", "hero", ""]  # latent 1 ties everywhere: the first slot; 2 never fires
    assert table.loc[0, "slot_share"] == 1.0 and table.loc[0, "slot_lift"] == pytest.approx(12.0)
    assert table.loc[1, "slot_share"] == pytest.approx(1 / 12) and table.loc[1, "slot_lift"] == pytest.approx(1.0)


def test_the_probe_beside_each_value_is_sslens_probe(tiny_run, tmp_path):
    import datasets
    import pandas as pd

    from sslens.features import name_latents
    from sslens.probe import probe

    model = load_model(tiny_run).eval()
    train, _ = run_stories(tiny_run)
    named = train.select(range(150)).select_columns(["story", "theme"])
    sae = SparseAutoencoder(SAEConfig("blocks.1.hook_resid_post", 64, 32, k=4))
    sae.initialise(torch.randn(50, 64))
    name_latents(model, sae, datasets.Dataset.from_dict(named.to_dict()), tmp_path)
    (theirs,) = probe(model, named["story"], named["theme"], ["blocks.1.hook_resid_post"])
    values = pd.read_csv(tmp_path / "values.csv")
    assert set(values["label"]) == {"theme"} and (values["probe_accuracy"] == theirs.accuracy).all()
    assert (values["probe_majority"] == theirs.majority).all()
    assert "slot" not in pd.read_csv(tmp_path / "latents.csv")  # not the generator's stories: no slots


def test_peak_histograms_count_the_stories_by_hand():
    peaks = np.array([[0.0, 1.0], [0.5, 0.0], [1.0, 0.0], [0.26, 0.0]], np.float32)  # [story, latent]
    acts = StoryActivations(peaks, peaks, np.zeros(peaks.shape, int), [[1]] * 4)
    h = peak_histograms(acts, bins=4)
    assert h["counts"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]  # 0.26 -> bin 1, 0.5 -> 2, 1.0 -> the last
    assert h["top"].tolist() == [1.0, 1.0] and h["silent"].tolist() == [1, 3]


def test_a_latent_is_named_by_its_best_value_and_a_strong_slot():
    from sslens.features import latent_name

    row = {"label": "theme", "value": "courage", "auroc": 0.934, "slot": "hero", "slot_lift": 2.5}
    assert latent_name(row) == "theme=courage (AUROC 0.93), slot hero (x2.5)"
    assert latent_name(row, min_lift=3.0) == "theme=courage (AUROC 0.93)"
    assert latent_name({"label": "", "value": "", "auroc": 0.5, "slot": "hero", "slot_lift": 1.5}) == ""
