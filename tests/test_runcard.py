"""The run card (`sslens eval`): each metric against a hand computation or an independent one, then the command."""

import json

import numpy as np
import pytest
import tokenizers
import torch
import torch.nn.functional as F
from tokenizers.models import WordLevel
from transformers import LlamaForCausalLM

from sslens import synth
from sslens.checkpoint import load_model, read_metrics, read_split
from sslens.cli import main
from sslens.config import DEFAULT_PROBE_HOOKS
from sslens.data import validation_stories
from sslens.probe import probe
from sslens.runcard import (
    RunCard,
    eval_stories,
    name_copying,
    name_mentions,
    picks_the_name,
    stories_loss,
    story_measures,
)
from sslens.tokenizer import encode, simplestories_pipeline

PROBE = 240  # stories for name copying and the probe in these tests


def test_picks_the_name_compares_only_with_other_names():
    logits = torch.tensor([0.0, 5.0, 3.0, 7.0, 1.0])
    names = torch.tensor([1, 2, 4])
    assert picks_the_name(logits, 1, names)  # 5 beats the other names' 3 and 1; token 3 (7.0) is not a name
    assert not picks_the_name(logits, 2, names)
    assert not picks_the_name(torch.tensor([0.0, 2.0, 2.0]), 1, torch.tensor([1, 2]))  # a tie is not a pick


def test_later_mentions_by_hand():
    words = ["zuzo", "met", "mage", ".", "ran", "to", ",", "and", "smiled", "mageon"]
    tok = simplestories_pipeline(
        tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 99}, unk_token="[UNK]"))
    )
    text = "Zuzo met Mage. Zuzo ran to Mageon, and Mage smiled. Mage ran."
    # tokens: zuzo0 met1 mage2 .3 zuzo4 ran5 to6 mageon7 ,8 and9 mage10 smiled11 .12 mage13 ran14 .15
    assert name_mentions(tok, text, ["Zuzo", "Mage"], n_ctx=64) == [4, 10, 13]
    assert name_mentions(tok, text, ["Zuzo", "Mage"], n_ctx=11) == [4, 10]
    assert name_mentions(tok, text, ["Mageon"], n_ctx=64) == []  # one mention: nothing to copy from


def _name_positions(text: str, tok, n_ctx: int, name: str) -> list[int]:
    """Where the token sequence of `name` occurs as a whole word (not followed by a ##continuation) and the text
    there is the name as written ("Blue Star", not "a blue star"); at the end of the window, a name cut short
    counts (its first token is in the window)."""
    enc = tok.encode(text, add_special_tokens=False)
    ids, name_ids = enc.ids[:n_ctx], tok.encode(name, add_special_tokens=False).ids
    vocab = {i: t for t, i in tok.get_vocab().items()}
    found = []
    for p in range(len(ids)):
        nxt = vocab.get(enc.ids[p + len(name_ids)], "") if p + len(name_ids) < len(enc.ids) else ""
        start = enc.offsets[p][0]
        if (
            ids[p : p + len(name_ids)] == name_ids[: len(ids) - p]
            and not nxt.startswith("##")
            and text[start : start + len(name)] == name
        ):
            found.append(p)
    return found


def test_name_copying_equals_a_story_by_story_computation(tiny_run):
    """The batched, padded, offset-mapped metric against one unpadded forward per story, names found as token
    sequences and candidates tokenised one name at a time."""
    model = load_model(tiny_run).eval()
    _, stories = eval_stories(tiny_run, None, 60)
    tok = model.tokenizer
    candidates = {encode(tok, name, eos=False)[0] for name in synth.all_names()}
    right = total = 0
    for text, gid in zip(stories["story"], stories["generation_id"]):
        cast = synth.story_cast(gid)
        ids = encode(tok, text, eos=False)[: model.cfg.n_ctx]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        for name in (cast["hero"], cast["friend"]):
            for p in _name_positions(text, tok, model.cfg.n_ctx, name)[1:]:
                others = [c for c in candidates if c != ids[p]]
                right += bool(logits[p - 1, ids[p]] > logits[p - 1, others].max())
                total += 1
    fraction, mentions = name_copying(model, stories, batch_size=7)
    assert mentions == total > 50
    assert fraction == pytest.approx(right / total, abs=1e-9)


def test_validation_loss_is_the_trainers_on_the_runs_held_out_stories(tiny_run):
    """Hand-cut windows and F.cross_entropy; and the trainer's own last val_loss, which read the same windows (the
    tiny run's held-out stories fill fewer windows than its val_batches x batch_size)."""
    model = load_model(tiny_run).eval()
    val = validation_stories(read_split(tiny_run))
    loss, n_tokens = stories_loss(model, val["story"], batch_size=5)
    stream = [i for s in val["story"] for i in encode(model.tokenizer, s, eos=True)]
    n = model.cfg.n_ctx
    windows = torch.tensor([stream[i * n : (i + 1) * n + 1] for i in range((len(stream) - 1) // n)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    assert n_tokens == windows[:, 1:].numel()
    assert loss == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())), abs=1e-5)
    logged = [r["val_loss"] for r in read_metrics(tiny_run / "metrics.jsonl")[0] if "val_loss" in r][-1]
    assert loss == pytest.approx(logged, abs=1e-4)


def test_one_forward_gives_name_copying_and_sslens_probe_on_the_last_token(tiny_run):
    model = load_model(tiny_run).eval()
    _, stories = eval_stories(tiny_run, None, PROBE)
    copying, mentions, block, hook, embed, chance = story_measures(model, stories)
    assert (copying, mentions) == name_copying(model, stories, batch_size=5)
    results = {r.hook: r for r in probe(model, stories["story"], stories["theme"], DEFAULT_PROBE_HOOKS, pool="last")}
    assert embed == results["hook_embed"].accuracy and chance == results["hook_embed"].majority
    blocks = {h: r.accuracy for h, r in results.items() if h != "hook_embed"}
    assert block == max(blocks.values()) and blocks[hook] == block


def test_probe_stories_are_held_out(tiny_run):
    """The run's validation stories, then fresh stories from beyond its corpus: none was trained on."""
    val, stories = eval_stories(tiny_run, None, PROBE)
    assert len(stories) == PROBE and stories["story"][: len(val)] == val["story"]
    train_ids = {f"synth-0-{i}" for i in range(2000)}
    assert not train_ids & set(stories["generation_id"])


def test_the_command_writes_cards_a_figure_and_an_export(tiny_run, tmp_path, capsys):
    main(
        [
            "eval",
            str(tiny_run),
            "--steps",
            "0,300",
            "--probe_stories",
            str(PROBE),
            "--json",
            str(tmp_path / "c.json"),
            "--plot",
            str(tmp_path / "c.html"),
            "--export",
            str(tmp_path / "hf"),
        ]
    )
    out = capsys.readouterr().out
    cards = json.loads((tmp_path / "c.json").read_text())
    assert [c["step"] for c in cards] == [0, 300]
    assert cards[1]["tokens_seen"] == 300 * 16 * 128
    assert cards[1]["val_loss"] < cards[0]["val_loss"] - 1
    assert all(len(c["continuations"]) == 5 for c in cards)
    assert f"{cards[1]['val_loss']:.4f}" in out and "plotly" in (tmp_path / "c.html").read_text()
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: transformers") and f"{cards[1]['val_loss']:.4f}" in readme
    assert f"{cards[1]['induction']:.3f} ({cards[1]['induction_head']})" in readme
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    tokens = torch.tensor([encode(load_model(tiny_run).tokenizer, "Once upon a time", eos=False)])
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, load_model(tiny_run)(tokens), atol=1e-4)


def test_one_card_is_printed_as_markdown(tiny_run, tmp_path, capsys):
    main(["eval", str(tiny_run), "--probe_stories", str(PROBE), "--json", str(tmp_path / "card.json")])
    card = RunCard(**json.loads((tmp_path / "card.json").read_text()))
    assert card.step == 300 and card.markdown() in capsys.readouterr().out
    assert card.continuations[0][0] == "Once upon a time" and card.name_mentions > 0
    assert 0 <= card.induction <= 1 and np.isfinite(card.val_loss)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "7"], "has no checkpoint at step 7"),
        (["--steps", "0,7"], "has no checkpoint at step 7"),
        (["--steps", "x"], "--steps takes 'all' or step numbers"),
        (["--step", "0", "--steps", "all"], "give --step N or --steps, not both"),
    ],
)
def test_bad_requests_are_one_line(tiny_run, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny_run), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_a_model_without_a_tokenizer_is_one_line(tmp_path, capsys):
    from sslens import HookedLlama

    HookedLlama.from_preset("1.25M", n_layers=1).save_hf(tmp_path / "m")
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "m")])
    assert "has no tokenizer" in capsys.readouterr().err
