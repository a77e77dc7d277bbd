"""The analysis notebooks run top to bottom against a run the tests train, and are committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"
NOTEBOOKS = sorted(ANALYSES.glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_activation_cache.ipynb",
        "02_metadata_probes.ipynb",
        "03_training_dynamics.ipynb",
        "04_causal_patching.ipynb",
        "05_features.ipynb",
    ]
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in cells), f"{path.name}: strip its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLENS_RUN", str(tiny_run))
    monkeypatch.setenv("SSLENS_SAE_OUT", str(tmp_path))  # the shared run stays without SAEs
    for name, value in {"WIDTH": "128", "K": "8", "TOKENS": "20000", "CHECKPOINTS": "2"}.items():
        monkeypatch.setenv(f"SSLENS_SAE_{name}", value)
    monkeypatch.setenv("SSLENS_FEATURE_STORIES", "200")
    monkeypatch.setenv("SSLENS_LENS_OUT", str(tmp_path))
    monkeypatch.setenv("SSLENS_LENS_CHECKPOINTS", "2")
    monkeypatch.setenv("SSLENS_LENS_TOKENS", "8192")
    monkeypatch.setenv("SSLENS_MAX_STORIES", "500")  # notebook 03's own default
    monkeypatch.setenv("SSLENS_PAIRS", "12")
    monkeypatch.setenv("SSLENS_STEP_PAIRS", "4")
    monkeypatch.setenv("SSLENS_NAME_STORIES", "40")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ANALYSES)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [
        o["data"]["application/vnd.plotly.v1+json"]
        for o in outputs
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert figures  # its figures were drawn
    titles = [a.get("text", "") for f in figures for a in f.get("layout", {}).get("annotations", [])]
    assert not [t for t in titles if t.startswith("facet_col=")], titles  # facets are named (L3H1, the score, ...)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "IProgress not found" not in printed and "Traceback" not in printed
