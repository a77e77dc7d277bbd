"""Features across checkpoints: decoder matching and births by hand; the command writes them from the SAEs it
trained (in test_sae)."""

import numpy as np
import pandas as pd
import pytest
import torch

from sslens.feature_steps import births, format_births, match_latents
from sslens.sae import SAEConfig, SparseAutoencoder


def test_latents_are_matched_by_decoder_direction():
    earlier = SparseAutoencoder(SAEConfig("blocks.0.hook_resid_post", 8, 5, k=2))
    later = SparseAutoencoder(SAEConfig("blocks.0.hook_resid_post", 8, 5, k=2))
    with torch.no_grad():
        earlier.W_dec.copy_(torch.eye(8)[:5])
        later.W_dec.copy_(torch.eye(8)[[3, 0, 1, 2, 5]] * 2.0)  # a permutation (any scale) and one new direction
        later.W_dec[4] += 0.1 * torch.eye(8)[4]  # mostly new, a little like earlier latent 4
    table = match_latents(earlier, later)
    assert list(table["match"]) == [3, 0, 1, 2, 4]
    assert np.allclose(table["cosine"][:4], 1.0) and table["cosine"][4] == pytest.approx(0.1 / np.sqrt(4.01))
    assert list(table["mutual"]) == [True, True, True, True, True]
    assert np.allclose(table["same_index_cosine"], [0, 0, 0, 0, table["cosine"][4]])


def test_a_birth_is_the_first_step_above_the_threshold():
    table = pd.DataFrame(
        {
            "label": ["theme"] * 6 + ["style"] * 3,
            "value": ["courage"] * 3 + ["kindness"] * 3 + ["poem"] * 3,
            "step": [10, 20, 30] * 3,
            "latent": [4, 7, 7, 1, 1, 1, 2, 2, 2],
            "auroc": [0.6, 0.92, 0.95, 0.91, 0.7, 0.93, 0.5, 0.6, 0.8],
            "precision": [0.5] * 9,
        }
    )
    found = births(table).set_index("value")
    assert (found.loc["courage", "birth_step"], found.loc["courage", "latent"]) == (20, 7)
    assert found.loc["courage", "stays"] and not found.loc["kindness", "stays"]
    assert found.loc["kindness", "birth_step"] == 10 and np.isnan(found.loc["poem", "birth_step"])
    assert found.loc["poem", "last_auroc"] == 0.8
    text = format_births(births(table))
    assert "style: 0 of 1 values" in text and "theme: 2 of 2 values (births by step: 10: 1, 20: 1)" in text
