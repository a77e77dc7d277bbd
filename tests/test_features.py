"""Latents named by story metadata: AUROC against scikit-learn, a planted latent found, pooling over left-padded
stories equal to one story at a time."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sslens import SSLensError
from sslens.checkpoint import load_model
from sslens.features import (
    StoryActivations,
    auroc,
    latent_table,
    sae_stories,
    story_activations,
    top_contexts,
    value_table,
)
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
    _, val = sae_stories(tiny_run)
    stories = list(val["story"][:6])
    sae = SparseAutoencoder(SAEConfig("blocks.1.hook_resid_post", 64, 96, k=6))
    sae.initialise(torch.randn(50, 64))
    pooled = story_activations(model, sae, stories, batch_size=4)
    for i, story in enumerate(stories):
        ids = torch.tensor([model.tokenizer.encode(story, add_special_tokens=False).ids[: model.cfg.n_ctx]])
        with torch.no_grad():
            f = sae.encode(activations(model, sae.cfg.hook_name, ids))[0]
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
