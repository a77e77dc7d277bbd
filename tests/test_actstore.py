"""The on-disk activation store: equal to the streamed activations, reused by key, refused before any work when the
disk lacks room, and read back a whole pass at a time."""

import numpy as np
import pytest
import torch

from sslens import SSLensError, actstore
from sslens.actstore import StoredActivations, activation_store
from sslens.checkpoint import load_model
from sslens.data import Batches, tokenize
from sslens.runcard import run_stories
from sslens.sae import SAEConfig, activations

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def windows(tiny_run):
    model = load_model(tiny_run).eval()
    train, _ = run_stories(tiny_run)
    return model, lambda: Batches(tokenize(train, model.tokenizer), model.cfg.n_ctx, 4, seed=3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_store_holds_the_windows_activations_in_order(windows, tmp_path, dtype):
    model, fresh = windows
    path = activation_store(model, HOOK, fresh(), 1000, dtype, root=tmp_path)
    stored = np.load(path / actstore.DATA_FILE)
    batches = fresh()
    expected = torch.cat([activations(model, HOOK, next(batches)[:, :-1]).flatten(0, 1) for _ in range(2)])[:1000]
    if dtype == "bf16":
        assert stored.dtype == np.uint16
        assert torch.equal(torch.from_numpy(stored).view(torch.bfloat16), expected.bfloat16())
    else:
        assert torch.equal(torch.from_numpy(stored), expected)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing half-written beside it


def test_a_store_is_reused_by_key_and_rebuilt_when_anything_changes(windows, tmp_path, monkeypatch):
    model, fresh = windows
    first = activation_store(model, HOOK, fresh(), 600, root=tmp_path)
    monkeypatch.setattr(actstore, "activations", lambda *a, **k: pytest.fail("recomputed a stored activation"))
    assert activation_store(model, HOOK, fresh(), 600, root=tmp_path) == first
    monkeypatch.undo()
    others = {
        activation_store(model, "blocks.1.hook_resid_post", fresh(), 600, root=tmp_path),
        activation_store(model, HOOK, fresh(), 700, root=tmp_path),
        activation_store(model, HOOK, fresh(), 600, "bf16", root=tmp_path),
    }
    with torch.no_grad():
        model.blocks[1].mlp.W_out.add_(1e-3)  # another checkpoint
    others.add(activation_store(model, HOOK, fresh(), 600, root=tmp_path))
    assert first not in others and len(others) == 4


def test_too_little_disk_is_refused_before_any_work(windows, tmp_path, monkeypatch):
    model, fresh = windows
    monkeypatch.setattr(actstore, "free_bytes", lambda path: 10_000)
    monkeypatch.setattr(actstore, "activations", lambda *a, **k: pytest.fail("harvested before checking the room"))
    with pytest.raises(SSLensError, match=r"needs 0.2 MiB at .* and 0.0 MiB is free; store bf16"):
        activation_store(model, HOOK, fresh(), 1000, root=tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(SSLensError, match="unknown activation store dtype 'fp16'; dtypes: fp32, bf16"):
        activation_store(model, HOOK, fresh(), 1000, "fp16", root=tmp_path)


def test_a_pass_over_the_store_reads_every_row_once(windows, tmp_path):
    model, fresh = windows
    path = activation_store(model, HOOK, fresh(), 1000, root=tmp_path)
    rows = StoredActivations(path, SAEConfig(HOOK, 64, 32, k=4, batch_tokens=100, buffer_tokens=300))
    assert torch.equal(rows.buffer, torch.from_numpy(np.load(path / actstore.DATA_FILE)[:300]))
    seen = torch.cat([next(rows) for _ in range(10)])
    stored = torch.from_numpy(np.load(path / actstore.DATA_FILE))
    assert not torch.equal(seen, stored)  # shuffled
    assert torch.equal(seen[seen[:, 0].argsort()], stored[stored[:, 0].argsort()])  # every row, once
    with pytest.raises(SSLensError, match="stores blocks.0.hook_resid_post"):
        StoredActivations(path, SAEConfig("blocks.1.hook_resid_post", 64, 32, k=4))


def test_two_widths_train_on_one_store(tiny_run, tmp_path, monkeypatch):
    from sslens.features import train_saes
    from sslens.sae import load_sae, read_eval

    monkeypatch.setenv("SSLENS_CACHE", str(tmp_path / "cache"))
    settings = {"k": 4, "tokens": 8192, "batch_tokens": 1024, "buffer_tokens": 4096, "store": "bf16"}
    for width in (64, 128):
        (path,) = train_saes(tiny_run, HOOK, [300], out=tmp_path, name_stories=0, d_sae=width, **settings)
        assert load_sae(path).cfg.d_sae == width and read_eval(path).fvu < 1.0
    assert len(list((tmp_path / "cache" / "activations").iterdir())) == 1
