import os
import socket
import tempfile

# No test may reach the network: the hub clients read these when first imported, so set them before sslens.
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["SSLENS_CACHE"] = tempfile.mkdtemp(prefix="sslens-test-cache-")  # never the user's ~/.cache

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sslens import HookedLlama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))

PRESETS = ["1.25M", "5M", "11M", "30M", "35M"]


def shared_file(relative: str) -> Path:
    """A file from ../shared/data (real SimpleStories/TinyStories material), or skip the test saying why."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(
            f"{path} is absent: the shared SimpleStories data sits beside the checkout (or set SSLENS_SHARED_DATA)"
        )
    return path


@pytest.fixture(scope="session")
def small_model() -> HookedLlama:
    """A 3-layer model with 4 query heads sharing 2 KV heads (so GQA is exercised) and non-trivial norm weights."""
    model = HookedLlama.from_preset("1.25M", seed=0, n_layers=3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_tokens(batch: int, pos: int, vocab: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run trained by the test session (2 layers, GQA, n_ctx 128, synth corpus): enough to write story-like
    text, with checkpoints on the default log schedule."""
    from sslens.config import load_train_config
    from sslens.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    model_cfg, cfg = load_train_config(
        "1.25M",
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=170,
        d_vocab=1024,
        n_ctx=128,
        batch_size=16,
        max_steps=300,
        warmup_steps=20,
        lr=1e-2,
        val_every=100,
        log_every=10,
        data="synth:2000",
        dtype="float32",
        compile="false",
        out_dir=str(out),
    )
    return train(model_cfg, cfg)


def assert_column_major(model) -> None:
    """Loading and training keep the weight layout that makes one-token steps fast (see model.column_major)."""
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert p.stride() == (1, p.shape[0]), name


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> an empty directory on a real filesystem of that size (a tmpfs), to fill it for real.
    Needs root and mount(8), as on the developers' and CI machines; skips saying so elsewhere."""
    import shutil
    import subprocess

    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real full disk needs root to mount a small tmpfs")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
