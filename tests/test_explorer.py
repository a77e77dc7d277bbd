import base64
import contextlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sslens import HookedLlama, SSLensError, load_model
from sslens.checkpoint import checkpoint_dir, find_models, resolve_model, saved_steps, tokens_seen
from sslens.features import find_saes, train_saes
from sslens.lens import EXPLORE_NEW_TOKENS, logit_lens, token_probabilities
from sslens.pairs import pairs
from sslens.patching import LogitDiff, pair_batch, sweep
from sslens.sae import activations, load_sae, save_sae

from conftest import free_port

pytest.importorskip("streamlit", reason="the explorer needs the app extra: pip install -e '.[app]'")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "explorer.py"


def start(root: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("SSLENS_RUNS", str(root))
    return AppTest.from_file(str(APP), default_timeout=120).run()


def z_of(trace: dict, key: str = "z") -> np.ndarray:
    """A heatmap's values (or a bar chart's, key "y") from plotly JSON (plain lists, or plotly's base64 typed
    arrays)."""
    z = trace[key]
    if isinstance(z, dict):
        shape = [int(n) for n in str(z.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
    return np.asarray(z, dtype=float)


def generation_html(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "<span title='p=" in m.value)


def charts(at: AppTest) -> dict[str, dict]:
    """Each plotly chart's figure and config, by the chart's key."""
    return {
        el.proto.id.rpartition("-")[2]: {**json.loads(el.proto.spec), "config": json.loads(el.proto.config)}
        for el in at.get("plotly_chart")
    }


def test_finding_and_resolving_models(tiny_run, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_run, root / "group" / "tiny")
    load_model(tiny_run).save_hf(root / "hf-model")
    (root / "notes").mkdir()
    assert find_models(root) == ["group/tiny", "hf-model"]
    assert resolve_model(root, "group/tiny") == (root / "group" / "tiny").resolve()
    for bad in ["../x", "group/../../x", str(tmp_path)]:
        with pytest.raises(SSLensError, match="runs root"):
            resolve_model(root, bad)
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(SSLensError, match="points outside the runs root"):
        resolve_model(root, "escape")
    seen = tokens_seen(tiny_run)
    assert list(seen) == saved_steps(tiny_run) and seen[0] == 0 and seen[4] == 4 * 16 * 128


def test_the_three_panels_follow_prompt_checkpoint_layer_and_head(tiny_run, monkeypatch):
    at = start(tiny_run.parent, monkeypatch)
    assert not at.exception and at.selectbox(key="run").value == "tiny"
    assert at.select_slider(key="step").value == saved_steps(tiny_run)[-1]
    at.text_area(key="prompt").input("the little dog ran to the tree and").run()
    at.select_slider(key="step").set_value(64).run()
    at.selectbox(key="layer").set_value(1).run()
    at.selectbox(key="head").set_value(2).run()
    assert not at.exception and not at.error
    assert "Features" not in [h.value for h in at.subheader] and not at.dataframe  # the run has no SAEs

    model = load_model(tiny_run, step=64)
    ids = model.tokenizer.encode("the little dog ran to the tree and", add_special_tokens=False).ids
    sample = model.generate([ids], EXPLORE_NEW_TOKENS, temperature=0, top_k=40, seed=0)[0]
    _, cache = model.run_with_cache(torch.tensor([ids + sample.tokens]))  # the maps cover prompt + continuation
    charts = [json.loads(el.proto.spec)["data"] for el in at.get("plotly_chart")]
    pattern, grid, summary, lens, target = charts
    np.testing.assert_allclose(z_of(pattern[0]), cache["blocks.1.attn.hook_pattern"][0, 2].numpy(), atol=1e-6)
    assert len(grid) == model.cfg.n_heads
    expected_lens = logit_lens(model, torch.tensor(ids + sample.tokens))
    np.testing.assert_allclose(z_of(lens[0]), expected_lens.top_probs[:, :, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(z_of(target[0]), expected_lens.target_probs.numpy(), atol=1e-6)
    probs = token_probabilities(model, torch.tensor(ids + sample.tokens), k=10)
    spans = re.findall(r"<span title='p=([\d.]+)'[^>]*>(.*?)</span>", generation_html(at))
    assert [text for _, text in spans] == [
        html.escape(model.tokenizer.id_to_token(t).removeprefix("##")) for t in sample.tokens
    ]
    assert [float(p) for p, _ in spans] == pytest.approx(probs.probs[len(ids) - 1 :].tolist(), abs=1e-3)
    table = at.table[0].value
    assert table["token"].tolist() == [model.tokenizer.id_to_token(t) for t in probs.top_tokens[len(ids) - 1].tolist()]


def shown_token_label(at: AppTest, browser: dict[str, str]) -> str:
    """The label a browser shows in the Token picker: one it has already drawn keeps the label it last showed
    unless the server sends a value (set_value); one new to it (a new widget id) shows the default option."""
    box = next(s for s in at.selectbox if s.label == "Token").proto
    if box.set_value:
        browser[box.id] = box.raw_value
    return browser.setdefault(box.id, box.options[box.default])


def assert_label_matches_table(label: str, at: AppTest) -> None:
    """Greedy decoding: the picked token is its table's top row, at the probability the label gives."""
    token, p = re.fullmatch(r"\d+: (.*) \(p=([\d.]+)\)", label).groups()
    top = at.table[0].value.iloc[0]
    assert (top["token"], float(p)) == (token, pytest.approx(float(top["probability"]), abs=6e-4)), label


def test_the_token_label_agrees_with_its_table_after_changing_prompt_and_checkpoint(tiny_run, monkeypatch):
    at = start(tiny_run.parent, monkeypatch)
    browser: dict[str, str] = {}
    shown_token_label(at, browser)
    box = next(s for s in at.selectbox if s.label == "Token")
    browser[box.proto.id] = box.options[1]  # the reader picks the second new token
    box.select_index(1).run()
    assert_label_matches_table(shown_token_label(at, browser), at)
    at.text_area(key="prompt").input("the little dog ran to the tree and").run()
    assert_label_matches_table(shown_token_label(at, browser), at)
    at.select_slider(key="step").set_value(64).run()
    assert not at.exception and not at.error
    assert_label_matches_table(shown_token_label(at, browser), at)


def test_the_maps_cover_the_continuation_with_titled_axes_and_a_toolbar(tiny_run, monkeypatch):
    at = start(tiny_run.parent, monkeypatch)
    model = load_model(tiny_run)
    ids = model.tokenizer.encode(at.text_area(key="prompt").value, add_special_tokens=False).ids
    new = model.generate([ids], EXPLORE_NEW_TOKENS, temperature=0, top_k=40, seed=0)[0].tokens
    labels = [f"{i}:{model.tokenizer.id_to_token(t)}" + ("*" if i >= len(ids) else "") for i, t in enumerate(ids + new)]
    figs = charts(at)
    assert new and figs["pattern"]["data"][0]["x"] == labels == figs["pattern"]["data"][0]["y"]
    assert all(trace["x"] == labels for trace in figs["grid"]["data"])
    assert figs["lens"]["data"][0]["x"] == labels and figs["target"]["data"][0]["x"] == labels[1:]
    titles = {
        name: (fig["layout"]["xaxis"]["title"]["text"], fig["layout"]["yaxis"]["title"]["text"])
        for name, fig in figs.items()
    }
    assert titles["pattern"][0].startswith("key") and titles["pattern"][1].startswith("query")
    assert titles["grid"] == ("key", "query") and "layer 0" in figs["grid"]["layout"]["title"]["text"]
    assert titles["summary_plot"] == ("head", "layer") and "generated" in titles["lens"][0]
    assert all(fig["config"]["displayModeBar"] is True for fig in figs.values())


def test_a_long_text_is_shown_through_a_position_window(tiny_run, monkeypatch):
    at = start(tiny_run.parent, monkeypatch)
    at.text_area(key="prompt").input("the " * 100).run()
    at.slider(key="max_new_tokens").set_value(200).run()  # generation stops at the run's n_ctx (128)
    window = next(s for s in at.slider if s.label.startswith("Positions shown"))
    first, last = window.value
    assert last == 127 and last - first + 1 == 32  # the whole context, its last 32 positions shown
    figs = charts(at)
    assert figs["lens"]["data"][0]["x"][0].startswith(f"{first}:") and len(figs["lens"]["data"][0]["x"]) == 32
    assert figs["lens"]["data"][0]["texttemplate"] == "%{text}" and z_of(figs["pattern"]["data"][0]).shape == (32, 32)
    window.set_value((0, 127)).run()
    figs = charts(at)
    assert len(figs["lens"]["data"][0]["x"]) == 128 and z_of(figs["pattern"]["data"][0]).shape == (128, 128)
    assert not figs["lens"]["data"][0].get("texttemplate") and figs["lens"]["data"][0]["customdata"]  # hover only


def typed_answers(model, clean, corrupt):
    """The explorer's metric for typed prompts, computed here: their next tokens, or if those agree the tokens the
    change favours most."""
    with torch.no_grad():
        lp = [model(t)[0, -1].log_softmax(-1) for t in (clean, corrupt)]
    a, b = int(lp[0].argmax()), int(lp[1].argmax())
    return ([a], [b]) if a != b else ([int((lp[0] - lp[1]).argmax())], [int((lp[1] - lp[0]).argmax())])


def test_the_patching_panel_follows_factor_and_checkpoint(tiny_run, monkeypatch):
    at = start(tiny_run.parent, monkeypatch)
    assert "patch_heads" not in charts(at), "patching runs only when asked for"
    at.toggle(key="patching").set_value(True).run()
    at.slider(key="patch_n").set_value(4).run()
    assert not at.exception and not at.error
    for step in (saved_steps(tiny_run)[-1], 64):
        at.select_slider(key="step").set_value(step).run()
        model = load_model(tiny_run, step=step)
        batch = vars(pair_batch(model, pairs("name", 4, 0, model.tokenizer, max_tokens=model.cfg.n_ctx)))
        for key, name in (("patch_heads", "heads"), ("patch_resid", "resid_pre")):
            expected = sweep(model, **batch, name=name).values.numpy()
            np.testing.assert_allclose(z_of(charts(at)[key]["data"][0]), expected.reshape(len(expected), -1), atol=1e-5)
    at.radio(key="patch_source").set_value("my prompts").run()
    assert not at.exception and not at.error and "patch_heads" in charts(at)
    clean, corrupt = (model.to_tokens(at.text_input(key=k).value) for k in ("patch_clean", "patch_corrupt"))
    a, b = typed_answers(model, clean, corrupt)
    expected = sweep(model, clean, corrupt, LogitDiff(a, b), "resid_pre").values.numpy()
    np.testing.assert_allclose(z_of(charts(at)["patch_resid"]["data"][0]), expected, atol=1e-5)
    assert any(f"logit({model.to_str_tokens(a)[0]})" in c.value for c in at.caption)
    at.text_input(key="patch_corrupt").input("Mia had a good friend named Leo and Rita. One day, Mia and").run()
    assert not at.exception and "same length" in at.error[0].value


def test_an_hf_model_directory_is_explored_without_a_slider(tiny_run, tmp_path, monkeypatch):
    model = load_model(tiny_run)
    model.save_hf(tmp_path / "root" / "exported")
    at = start(tmp_path / "root", monkeypatch)
    assert not at.exception and not at.error and not at.select_slider
    assert at.selectbox(key="run").value == "exported" and len(at.get("plotly_chart")) == 5


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty root", "No runs under"),
        ("no checkpoints", "has no checkpoints yet"),
        ("truncated checkpoint", "unreadable"),
        ("long prompt", "the context is 128"),
        ("empty prompt", "Type a prompt"),
    ],
)
def test_bad_input_gives_a_message_not_a_traceback(case, message, tiny_run, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    if case == "no checkpoints":
        (root / "fresh").mkdir()
        shutil.copy(tiny_run / "config.yaml", root / "fresh" / "config.yaml")
    elif case != "empty root":
        shutil.copytree(tiny_run, root / "tiny")
    if case == "truncated checkpoint":
        newest = root / "tiny" / "checkpoints" / f"step_{saved_steps(tiny_run)[-1]:07d}" / "model.safetensors"
        newest.write_bytes(newest.read_bytes()[:1000])
    at = start(root, monkeypatch)
    if case == "long prompt":
        at.text_area(key="prompt").input("the dog " * 100).run()
    if case == "empty prompt":
        at.text_area(key="prompt").input("   ").run()
    assert not at.exception
    shown = [e.value for e in (*at.info, *at.warning, *at.error)]
    assert any(message in text for text in shown), shown


@contextlib.contextmanager
def explorer_in_browser(runs: Path):
    """`streamlit run` of the explorer over `runs` on a free local port, loaded in headless Chromium (Debian's
    chromium + chromium-driver, driven by Selenium) until its three panels have drawn."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("no browser: install Debian's chromium and chromium-driver (.ci/run does when it can use apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address=127.0.0.1", f"--server.port={port}",
         "--server.headless=true", "--browser.gatherUsageStats=false", "--", "--runs", str(runs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1700,1100"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=webdriver.ChromeService(chromedriver), options=options)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                browser.get(f"http://127.0.0.1:{port}")
                break
            except Exception:  # the server is still starting
                time.sleep(1)
        WebDriverWait(browser, 180).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 5)
        yield browser
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_explorer_renders_in_a_real_browser(tiny_run, tmp_path):
    """The three panels draw in a real browser (the screenshots are kept as test artifacts); a prompt that fills the
    run's whole context (n_ctx 128: 108 prompt tokens + 20 new) still draws readably, through the position window;
    and the Token picker's label agrees with its table (a browser keeps a widget's label by its id, which AppTest
    cannot show in full)."""
    from selenium.webdriver.common.by import By

    artifacts = Path(os.environ.get("SSLENS_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with explorer_in_browser(tiny_run.parent) as browser:
        text = browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(artifacts / "explorer.png"))
        assert {"Generation", "Attention", "Logit lens"} <= set(text.splitlines())
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]') and "Traceback" not in text
        assert (artifacts / "explorer.png").stat().st_size > 10_000
        sidebar_ticks = browser.find_elements(
            By.CSS_SELECTOR, "[data-testid='stSidebar'] [data-testid='stSliderTickBar']"
        )
        assert sidebar_ticks and not any(t.is_displayed() for t in sidebar_ticks)  # they overlapped the Prompt label
        assert "from step 0 (0 tokens) to step 300" in text
        assert_browser_label_matches_table(browser, By)
        assert_a_full_context_reads_well(browser, 108, artifacts / "explorer-128-tokens.png")


@pytest.mark.slow
def test_a_300_token_text_reads_well_in_a_real_browser(tiny_run, tmp_path):
    """A model with a 320-token context (the 1.25M architecture with the test run's tokenizer, untrained: how it
    reads, not what it says), given a 300-token prompt: the view over prompt + 20 new tokens stays readable."""
    runs = tmp_path / "runs"
    tokenizer = load_model(tiny_run).tokenizer
    model = HookedLlama.from_preset("1.25M", seed=0, n_ctx=320, d_vocab=tokenizer.get_vocab_size())
    model.tokenizer = tokenizer
    model.save_hf(runs / "long-context")
    artifacts = Path(os.environ.get("SSLENS_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with explorer_in_browser(runs) as browser:
        assert_a_full_context_reads_well(browser, 300, artifacts / "explorer-320-tokens.png")


def assert_a_full_context_reads_well(browser, n_prompt: int, screenshot: Path) -> None:
    """Type a prompt of `n_prompt` tokens; once drawn, the logit lens shows a window of at most 32 positions ending at
    the last new token, with cell text of 8px or more, and the Token picker still agrees with its table."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    prompt = browser.find_element(By.CSS_SELECTOR, "[data-testid='stTextArea'] textarea")
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys("the " * n_prompt)
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    WebDriverWait(browser, 180).until(
        lambda b: (
            "Positions shown" in b.find_element(By.TAG_NAME, "body").text
            and len(b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 5
        )
    )
    WebDriverWait(browser, 60).until(
        lambda b: not b.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget'] button")
    )
    time.sleep(2)
    browser.save_screenshot(str(screenshot))
    assert_browser_label_matches_table(browser, By)
    lens = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[3]
    ticks = [t.text for t in lens.find_elements(By.CSS_SELECTOR, ".xtick text")]
    assert 0 < len(ticks) <= 32 and ticks[-1].endswith("*"), ticks  # the window ends at the last new token
    assert int(ticks[0].partition(":")[0]) > n_prompt - 20, ticks
    cells = [t for t in lens.find_elements(By.CSS_SELECTOR, ".heatmaplayer text") if t.text]
    assert cells and min(float(c.value_of_css_property("font-size").removesuffix("px")) for c in cells) >= 8
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')


def assert_browser_label_matches_table(browser, By) -> None:
    """The Token picker as drawn: its label "i: token (p=...)" against its table's top row (greedy decoding)."""
    label = browser.find_element(By.CSS_SELECTOR, "[data-testid='stSelectbox'] input[aria-label='Token']")
    token, p = re.fullmatch(r"\d+: (.*) \(p=([\d.]+)\)", label.get_attribute("value")).groups()
    row = browser.find_element(By.CSS_SELECTOR, "[data-testid='stTable'] tbody tr")
    top_token, top_p = [c.text for c in row.find_elements(By.CSS_SELECTOR, "td")][-2:]
    assert (top_token, float(p)) == (token, pytest.approx(float(top_p), abs=6e-4)), (
        label.get_attribute("value"),
        row.text,
    )


# The explorer stays inside its runs root, and a file it cannot read is a message on the page (issue 17).


def small_run(tiny_run: Path, dest: Path, steps: tuple[int, ...] = (64, 300)) -> Path:
    """What the explorer reads of the tiny run, with two of its checkpoints: a fraction of a full copy."""
    dest.mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        shutil.copy(tiny_run / name, dest / name)
    for step in steps:
        shutil.copytree(
            checkpoint_dir(tiny_run, step), checkpoint_dir(dest, step), ignore=shutil.ignore_patterns("trainer.pt")
        )
    return dest


@pytest.fixture(scope="module")
def tiny_hf(tiny_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-hf"
    load_model(tiny_run).save_hf(path)
    return path


def model_dir(kind: str, tiny_run: Path, tiny_hf: Path, dest: Path) -> Path:
    if kind == "run":
        return small_run(tiny_run, dest)
    return Path(shutil.copytree(tiny_hf, dest))


def watch_reads(path: Path):
    """A function listing what under `path` has been read since: each file's and directory's access time is set
    before its modification time, which the kernel then updates on the next read, even under relatime."""
    probe = path.parent / "probe"
    probe.write_text("x")
    watched = [probe, path, *path.rglob("*")] if path.is_dir() else [probe, path]
    marks = {}
    for p in watched:
        mtime = p.stat().st_mtime_ns
        os.utime(p, ns=(mtime - 10**12, mtime))
        marks[p] = p.stat().st_atime_ns
    probe.read_text()
    if probe.stat().st_atime_ns == marks.pop(probe):
        pytest.skip(f"the filesystem of {path} does not record reads (mounted noatime)")
    return lambda: [str(p) for p in marks if p.stat().st_atime_ns != marks[p]]


@pytest.mark.parametrize(
    "kind, linked",
    [
        ("run", "config.yaml"),
        ("run", "tokenizer.json"),
        ("run", "metrics.jsonl"),
        ("run", "checkpoints"),
        ("run", "checkpoints/step_0000300"),
        ("run", "checkpoints/step_0000300/model.safetensors"),
        ("hf", "config.json"),
        ("hf", "model.safetensors"),
        ("hf", "tokenizer.json"),
    ],
)
def test_a_link_leading_outside_the_root_is_refused_and_never_read(
    kind, linked, tiny_run, tiny_hf, tmp_path, monkeypatch
):
    model = model_dir(kind, tiny_run, tiny_hf, tmp_path / "root" / "model")
    outside = tmp_path / "outside" / linked
    outside.parent.mkdir(parents=True)
    (model / linked).rename(outside)  # the genuine file, so that following the link would load fine
    (model / linked).symlink_to(outside)
    reads = watch_reads(outside)
    at = start(tmp_path / "root", monkeypatch)
    assert not at.exception and not at.error and not at.get("plotly_chart") and not at.select_slider
    assert any(f"model/{linked} leads outside the runs root" in w.value for w in at.warning), at.warning
    assert reads() == []


def test_links_that_stay_inside_the_root_are_followed(tiny_run, tmp_path, monkeypatch):
    real = tmp_path / "real-root"
    run = small_run(tiny_run, real / "tiny")
    (real / "store").mkdir()
    (tmp_path / "root").symlink_to(real)  # the runs root may itself be a link
    (run / "tokenizer.json").rename(real / "store" / "tokenizer.json")
    (run / "tokenizer.json").symlink_to(Path("..") / "store" / "tokenizer.json")
    (run / "checkpoints").rename(real / "store" / "checkpoints")
    (run / "checkpoints").symlink_to(tmp_path / "root" / "store" / "checkpoints")
    at = start(tmp_path / "root", monkeypatch)
    assert not at.exception and not at.warning and not at.error
    assert at.selectbox(key="run").options == ["tiny"] and len(at.get("plotly_chart")) == 5


def test_a_metrics_file_cut_mid_line_still_shows_the_run(tiny_run, tmp_path, monkeypatch):
    run = small_run(tiny_run, tmp_path / "root" / "tiny")
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(metrics[: -len(metrics.splitlines()[-1]) // 2])  # step 300's record cut short
    at = start(tmp_path / "root", monkeypatch)
    assert not at.exception and not at.warning and not at.error and len(at.get("plotly_chart")) == 5
    assert at.select_slider(key="step").options == [f"step 64 ({64 * 16 * 128:,} tokens)", "step 300"]


@pytest.mark.parametrize(
    "kind, damaged, damage, message",
    [
        ("run", "config.yaml", bytes(range(256)), "model"),  # not UTF-8
        ("run", "config.yaml", b"n_layers: [\n", "config.yaml is unreadable"),
        ("run", "config.yaml", b"- a list\n", "config.yaml is not a mapping"),
        ("run", "tokenizer.json", b"{not json", "tokenizer.json is not a tokenizers JSON file"),
        ("run", "checkpoints", b"a file", "has no checkpoints yet"),
        ("hf", "config.json", b"[]", "model"),
        ("hf", "tokenizer.json", bytes(range(256)), "tokenizer.json is not a tokenizers JSON file"),
        ("run", "config.yaml", "loop", "config.yaml is a loop of symbolic links"),
        ("run", "tokenizer.json", "loop", "tokenizer.json is a loop of symbolic links"),
        ("run", "checkpoints", "loop", "checkpoints is a loop of symbolic links"),
        ("hf", "model.safetensors", "loop", "model.safetensors is a loop of symbolic links"),
    ],
)
def test_an_unreadable_file_gives_a_message_not_a_traceback(
    kind, damaged, damage, message, tiny_run, tiny_hf, tmp_path, monkeypatch
):
    model = model_dir(kind, tiny_run, tiny_hf, tmp_path / "root" / "model")
    shutil.rmtree(model / damaged) if (model / damaged).is_dir() else (model / damaged).unlink()
    if damage == "loop":
        (model / damaged).symlink_to(model / "other")
        (model / "other").symlink_to(model / damaged)
    else:
        (model / damaged).write_bytes(damage)
    at = start(tmp_path / "root", monkeypatch)
    assert not at.exception and not at.get("plotly_chart")
    shown = [e.value for e in (*at.warning, *at.error)]
    assert any(message in text for text in shown), shown


# The Features panel: the prompt through a run's sparse autoencoders (issue 21).

SAE_HOOK, SAE_FAMILY = "blocks.1.hook_resid_post", "blocks.1.hook_resid_post/topk-64-k4"


@pytest.fixture(scope="module")
def sae_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's checkpoints 64, 128 and 300 with a small TopK SAE at 64 and 300 (none at 128), its latents
    named by 200 stories (values.csv without the probes' accuracies); a copy, so the shared run stays without SAEs."""
    run = small_run(tiny_run, tmp_path_factory.mktemp("features") / "root" / "tiny", steps=(64, 128, 300))
    shutil.copy(tiny_run / "split.json", run / "split.json")
    settings = dict(d_sae=64, k=4, tokens=8192, batch_tokens=1024, buffer_tokens=4096)
    train_saes(run, SAE_HOOK, steps=[64, 300], name_stories=200, probes=False, **settings)  # the panel shows no probes
    return run


def prompt_latents(run: Path, step: int, prompt: str) -> tuple[list[str], torch.Tensor]:
    """The prompt's tokens and its latent activations [pos, d_sae] through the run's SAE at `step`, computed here."""
    model, sae = load_model(run, step=step), load_sae(find_saes(run)[SAE_FAMILY][step])
    ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
    with torch.inference_mode():
        latents = sae.encode(activations(model, SAE_HOOK, torch.tensor([ids])))[0]
    return [model.tokenizer.id_to_token(i) for i in ids], latents


def listed_latents(row: dict) -> list[tuple[int, float, str]]:
    """A token's row of the panel's table: (latent, activation, name) of each latent listed, most active first."""
    cells = [row[c] for c in row if c.startswith("top ") and row[c]]
    return [(int(m[1]), float(m[2]), m[3]) for m in (re.fullmatch(r"#(\d+) ([\d.]+) ?(.*)", c) for c in cells)]


def test_the_features_panel_shows_each_tokens_most_active_latents_at_the_current_checkpoint(sae_run, monkeypatch):
    at = start(sae_run.parent, monkeypatch)
    assert not at.exception and not at.error and "Features" in [h.value for h in at.subheader]
    prompt = at.text_area(key="prompt").value
    shown = {}
    for step in (300, 64):
        at.select_slider(key="step").set_value(step).run()
        directory = find_saes(sae_run)[SAE_FAMILY][step]
        assert not at.exception and not at.error and any(directory.name in c.value for c in at.caption)
        tokens, expected = prompt_latents(sae_run, step, prompt)
        table = at.dataframe[0].value
        assert table["token"].tolist() == tokens  # a row per prompt token
        names = pd.read_csv(directory / "latents.csv", keep_default_na=False).set_index("latent")
        values, top = expected.topk(3, dim=-1)
        for row, vs, ls in zip(table.to_dict("records"), values.tolist(), top.tolist()):
            listed = listed_latents(row)
            assert [j for j, _, _ in listed] == [j for v, j in zip(vs, ls) if v > 0]
            assert [a for _, a, _ in listed] == pytest.approx([v for v in vs if v > 0], abs=6e-3)
            for j, _, name in listed:
                label, value, auroc = names.loc[j, ["label", "value", "auroc"]]
                named = f"{label}={value} (AUROC {auroc:.2f})" if label else ""
                assert name.startswith(named) and (label or name == "" or name.startswith("slot "))
        shown[step] = table
        assert_the_latent_details(at, directory, expected)
    assert not shown[64].equals(shown[300])
    at.select_slider(key="step").set_value(128).run()
    assert not at.exception and not at.error and not at.dataframe
    assert [i.value for i in at.info] == [f"{SAE_FAMILY} has no SAE at step 128; steps with one: 64, 300"]


def assert_the_latent_details(at: AppTest, directory: Path, expected: torch.Tensor) -> None:
    """The latent picked at first is the prompt's most active; its name row, top contexts, peak histogram and
    activation over the prompt are those of `directory`'s files and of `expected` (the prompt's latents)."""
    box = next(s for s in at.selectbox if s.label.startswith("Latent"))
    latent = int(expected.max(0).values.argmax())
    assert box.value == latent and box.options[0].startswith(f"#{latent} ")
    row, contexts = at.table[1].value, at.table[2].value
    assert row["latent"].tolist() == [latent]
    assert contexts["context"].tolist() == [
        c["context"] for c in json.loads((directory / "contexts.json").read_text())[str(latent)]
    ]
    figs = charts(at)
    np.testing.assert_allclose(z_of(figs["feature_tokens"]["data"][0], "y"), expected[:, latent].numpy(), atol=1e-5)
    histogram = load_file(directory / "histograms.safetensors")
    np.testing.assert_array_equal(z_of(figs["feature_histogram"]["data"][0], "y"), histogram["counts"][latent].numpy())
    titles = [(f["layout"]["xaxis"]["title"]["text"], f["layout"]["yaxis"]["title"]["text"]) for f in figs.values()]
    assert ("peak activation in a story", "stories") in titles and ("prompt token", "activation") in titles


def test_the_features_panel_rereads_a_replaced_sae_shows_unnamed_latents_and_picks_a_family(
    sae_run, tmp_path, monkeypatch
):
    run = Path(shutil.copytree(sae_run, tmp_path / "root" / "tiny"))
    at = start(tmp_path / "root", monkeypatch)
    before = at.dataframe[0].value
    assert any(name for row in before.to_dict("records") for _, _, name in listed_latents(row))
    directory = find_saes(run)[SAE_FAMILY][300]
    save_sae(load_sae(find_saes(run)[SAE_FAMILY][64]), directory)  # trained again, on stories without labels
    at.run()
    assert not at.exception and not at.error
    _, expected = prompt_latents(run, 300, at.text_area(key="prompt").value)
    rows = at.dataframe[0].value.to_dict("records")
    values, top = expected.max(-1)
    assert [listed_latents(r)[0][0] for r in rows] == top.tolist()  # each token's most active latent, now unnamed
    assert [listed_latents(r)[0][1] for r in rows] == pytest.approx(values.tolist(), abs=6e-3)
    assert not at.dataframe[0].value.equals(before) and all(n == "" for r in rows for _, _, n in listed_latents(r))
    assert len(at.table) == 1 and set(charts(at)) & {"feature_histogram", "feature_tokens"} == {"feature_tokens"}
    shutil.copytree(directory.parent, directory.parents[1] / "relu-64")  # a second family
    at.run()
    assert at.selectbox(key="sae_family").options == [f"{SAE_HOOK}/relu-64", SAE_FAMILY]
    at.selectbox(key="sae_family").set_value(f"{SAE_HOOK}/relu-64").run()
    assert not at.exception and not at.error and any("relu-64/step_0000300" in c.value for c in at.caption)


@pytest.mark.parametrize("linked", ["saes", f"saes/{SAE_FAMILY}/step_0000300/sae_weights.safetensors"])
def test_an_sae_file_leading_outside_the_root_is_refused_and_never_read(linked, sae_run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(sae_run, tmp_path / "root" / "tiny"))
    outside = tmp_path / "outside" / linked
    outside.parent.mkdir(parents=True)
    (run / linked).rename(outside)
    (run / linked).symlink_to(outside)
    reads = watch_reads(outside)
    at = start(tmp_path / "root", monkeypatch)
    assert not at.exception and not at.dataframe and len(at.get("plotly_chart")) == 5  # the other panels are shown
    assert any(f"tiny/{linked} leads outside the runs root" in e.value for e in at.error), at.error
    assert reads() == []


def test_the_lens_panel_toggles_to_a_checkpoints_tuned_lens(tiny_run, tmp_path, monkeypatch):
    """At a checkpoint with a tuned lens, the toggle shows it (its top-1 probabilities and next-token
    probabilities, computed here independently); at one without, the toggle is greyed out with a note."""
    from sslens.tuned_lens import find_tuned_lens, train_lenses

    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    train_lenses(run, [300], tokens=20_000)
    at = start(run.parent, monkeypatch)
    at.text_area(key="prompt").input("the little dog ran to the tree and").run()
    assert not at.radio(key="lens_kind").disabled
    at.radio(key="lens_kind").set_value("tuned lens").run()
    assert not at.exception and not at.error
    model = load_model(run, step=300)
    ids = model.tokenizer.encode("the little dog ran to the tree and", add_special_tokens=False).ids
    sample = model.generate([ids], EXPLORE_NEW_TOKENS, temperature=0, top_k=40, seed=0)[0]
    tokens = torch.tensor(ids + sample.tokens)
    tuned = logit_lens(model, tokens, tuned=find_tuned_lens(run, 300, model))
    lens, target = charts(at)["lens"]["data"], charts(at)["target"]["data"]
    np.testing.assert_allclose(z_of(lens[0]), tuned.top_probs[:, :, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(z_of(target[0]), tuned.target_probs.numpy(), atol=1e-6)
    assert not np.allclose(z_of(lens[0]), logit_lens(model, tokens).top_probs[:, :, 0].numpy(), atol=1e-3)
    at.select_slider(key="step").set_value(64).run()
    assert at.radio(key="lens_kind").disabled and any("No tuned lens at this checkpoint" in c.value for c in at.caption)
    model = load_model(run, step=64)
    sample = model.generate([ids], EXPLORE_NEW_TOKENS, temperature=0, top_k=40, seed=0)[0]
    plain = logit_lens(model, torch.tensor(ids + sample.tokens))
    np.testing.assert_allclose(z_of(charts(at)["lens"]["data"][0]), plain.top_probs[:, :, 0].numpy(), atol=1e-6)
