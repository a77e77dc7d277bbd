"""The published models by hub name, tested without a network: our export is placed in a real Hugging Face hub
cache (the layout `huggingface_hub` writes, checked by its own `scan_cache_dir`) and loaded offline from there."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir

from sslens import HookedLlama, load_model
from sslens.cli import main
from sslens.tokenizer import placeholder_tokenizer

from conftest import free_port

REPO = "SimpleStories/SimpleStories-5M"
PROMPT = "t5 t6 t7"
GENERATE = ["--prompt", PROMPT, "--seed", "0", "--max_new_tokens", "12", "--temperature", "1.0", "--json"]


def publish_to_cache(export: Path, cache: Path, repo: str) -> Path:
    """Place `export`'s files in `cache` as huggingface_hub stores a download of `repo` at its main branch:
    content-addressed blobs, a snapshot folder of relative symlinks named by the commit, refs/main naming it."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    files = sorted(f for f in export.iterdir() if f.is_file())
    commit = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    snapshot = storage / "snapshots" / commit
    for d in (storage / "blobs", storage / "refs", snapshot):
        d.mkdir(parents=True)
    for f in files:
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (storage / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[HookedLlama, Path, Path]:
    """(model, its local export directory, a hub cache holding that export as REPO)."""
    root = tmp_path_factory.mktemp("hub")
    model = HookedLlama.from_preset("1.25M", seed=4, n_layers=2, d_vocab=512).eval()
    model.tokenizer = placeholder_tokenizer(model.cfg.d_vocab)
    model.save_hf(root / "export")
    publish_to_cache(root / "export", root / "cache", REPO)
    return model, root / "export", root / "cache"


def test_the_hand_built_cache_is_one_huggingface_hub_recognises(published):
    _, export, cache = published
    info = scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type, set(repo.refs)) == (REPO, "model", {"main"})
    (revision,) = repo.revisions
    assert {f.file_name for f in revision.files} == {f.name for f in export.iterdir()}


def test_load_model_by_hub_name_reads_the_offline_cache(published, monkeypatch):
    model, _, cache = published
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(cache.parent)  # no local directory of that name
    loaded = load_model(REPO)
    assert loaded.cfg.model_name == REPO
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, w in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name
    assert loaded.tokenizer.encode(PROMPT).ids == model.tokenizer.encode(PROMPT).ids


def test_the_console_command_generates_from_a_hub_name_as_from_the_export(published, capsys):
    _, export, cache = published
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    hub = subprocess.run(
        [sys.executable, "-m", "sslens", "generate", REPO, *GENERATE],
        cwd=cache.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert hub.returncode == 0, hub.stderr
    main(["generate", str(export), *GENERATE])
    local = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in json.loads(hub.stdout)] == [s["tokens"] for s in local]
    assert len(local[0]["tokens"]) == 12


def test_an_uncached_hub_name_offline_is_one_line_saying_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        main(["generate", REPO, "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2
    assert err.count("\n") == 1 and err.startswith("sslens: error: ") and "Traceback" not in err
    assert REPO in err and "HF_HUB_OFFLINE" in err and str(tmp_path) in err


def test_an_unreachable_hub_is_one_line_naming_the_cause(tmp_path):
    """Online, with nothing listening at the hub's address: the connection error is named, not hidden."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": nowhere, "HF_HUB_CACHE": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "sslens", "generate", REPO, "--prompt", PROMPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(f"sslens: error: {REPO} is not in the hub cache {tmp_path}")
    assert run.stderr.count("\n") == 1
    assert "Connection refused" in run.stderr


def test_the_explorer_offers_a_hub_name_given_at_start(published, tmp_path, monkeypatch):
    """`--hub NAME` (here SSLENS_HUB) puts the model in the run picker; it loads from the offline cache and the
    panels show it exactly as the model computes it."""
    from streamlit.testing.v1 import AppTest

    model, _, cache = published
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLENS_RUNS", str(tmp_path / "no-runs"))
    monkeypatch.setenv("SSLENS_HUB", REPO)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "apps" / "explorer.py"), default_timeout=120).run()
    at.text_area(key="prompt").set_value(PROMPT).run()
    assert not at.exception and not at.error and not at.select_slider
    assert at.selectbox(key="run").options == [f"{REPO} (hub)"]
    greedy = model.generate(PROMPT, 8, temperature=0)[0].text.split()
    assert all(word in next(m.value for m in at.markdown if "<span title='p=" in m.value) for word in greedy[:3])


def test_the_run_card_of_a_hub_name_is_the_card_of_its_export(tiny_run, tmp_path):
    """`sslens eval NAME` offline, from the hub cache, gives the card the export directory gives."""
    repo = "SimpleStories/SimpleStories-1.25M"
    load_model(tiny_run).save_hf(tmp_path / "export")
    publish_to_cache(tmp_path / "export", tmp_path / "cache", repo)
    args = ["--data", "synth:2000", "--probe_stories", "200", "--json"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    hub = subprocess.run(
        [sys.executable, "-m", "sslens", "eval", repo, *args, str(tmp_path / "hub.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert hub.returncode == 0, hub.stderr
    main(["eval", str(tmp_path / "export"), *args, str(tmp_path / "local.json")])
    from_hub, local = (json.loads((tmp_path / f).read_text()) for f in ("hub.json", "local.json"))
    assert from_hub.pop("model") == repo and local.pop("model") == "export"
    assert from_hub == local and local["val_loss"] is not None and local["name_mentions"] > 0
