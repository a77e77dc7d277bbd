import copy
import functools
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from sslens import SSLensError, load_model
from sslens.generate import left_pad, sample_tokens, step_function, stream
from sslens.model import KVCache

from conftest import random_tokens

PROMPTS = ["once upon a time", "the little dog ran to the big tree and", "mia", "a storm came over the hills"]


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(tiny_run)


def greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt) :].tolist()


def test_kv_cached_greedy_equals_full_reforward(model):
    for prompt in PROMPTS[:2]:
        ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
        sample = model.generate(prompt, max_new_tokens=50, temperature=0, stop_at_eos=False)[0]
        assert sample.prompt_tokens == ids
        assert sample.tokens == greedy_by_full_forward(model, ids, 50)


def test_greedy_equals_transformers_generate_on_the_hf_export(model, tmp_path):
    from transformers import LlamaForCausalLM

    model.save_hf(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for prompt in PROMPTS[:2]:
        ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
        expected = hf.generate(
            torch.tensor([ids]), max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        ours = model.generate([ids], max_new_tokens=50, temperature=0, stop_at_eos=False)[0]
        assert ours.tokens == expected[0, len(ids) :].tolist()


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "pattern-hooked"])
def test_left_padded_batch_gives_each_row_its_own_logits(model, explicit):
    prompts = [random_tokens(1, n, 1024, seed=n)[0].tolist() for n in (5, 12, 1, 8)]
    tokens, mask = left_pad(prompts, pad=0)
    hooks = [(lambda name: name.endswith("hook_pattern"), lambda t, hook: t)] if explicit else []
    with torch.no_grad():
        batched = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        for row, prompt in enumerate(prompts):
            alone = model.run_with_hooks(torch.tensor([prompt]), fwd_hooks=hooks)[0]
            torch.testing.assert_close(batched[row, -len(prompt) :], alone, atol=1e-5, rtol=1e-5)


def test_left_padded_loss_counts_only_real_predictions(small_model):
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (9, 4)]
    tokens, mask = left_pad(prompts, pad=0)
    with torch.no_grad():
        padded = small_model(tokens, "loss", attention_mask=mask)
        alone = [small_model(torch.tensor([p]), "loss") for p in prompts]
    expected = (alone[0] * 8 + alone[1] * 3) / 11  # each row's mean loss over its n - 1 predictions
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "pattern-hooked"])
def test_feeding_a_kv_cache_in_pieces_equals_one_forward(small_model, explicit):
    tokens = random_tokens(2, 24)
    hooks = [(lambda name: name.endswith("hook_pattern"), lambda t, hook: t)] if explicit else []
    cache = KVCache(small_model.cfg, batch=2)
    with torch.no_grad():
        full = small_model.run_with_hooks(tokens, fwd_hooks=hooks)
        pieces = [
            small_model.run_with_hooks(tokens[:, a:b], past_kv_cache=cache, fwd_hooks=hooks)
            for a, b in [(0, 7), (7, 8), (8, 15), (15, 24)]
        ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 24 and cache.next_position.tolist() == [24, 24]


def test_batched_generation_equals_one_by_one(model):
    batched = model.generate(PROMPTS, max_new_tokens=40, temperature=0)
    alone = [model.generate(p, max_new_tokens=40, temperature=0)[0] for p in PROMPTS]
    assert [s.tokens for s in batched] == [s.tokens for s in alone]
    assert [s.text for s in batched] == [s.text for s in alone]
    for a, b in zip(batched, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_logprobs_are_the_models_log_probabilities(model):
    sample = model.generate(PROMPTS[0], max_new_tokens=10, temperature=0.8, top_k=5, seed=3)[0]
    with torch.no_grad():
        logits = model(torch.tensor([sample.prompt_tokens + sample.tokens]))[0]
    n = len(sample.prompt_tokens)
    expected = logits[n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(sample.tokens)[:, None])[:, 0]
    assert sample.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_top_k_and_top_p_never_sample_outside_their_support():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]]).repeat(20000, 1)
    probs = logits[0].softmax(-1)
    gen = torch.Generator().manual_seed(0)
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(sample_tokens(logits, top_k=3, generator=gen).tolist()) == top3
    # top-p 0.7: the smallest prefix of the sorted probabilities that reaches 0.7
    order = probs.argsort(descending=True)
    keep = order[: int((probs[order].cumsum(0) < 0.7).sum()) + 1]
    drawn = sample_tokens(logits, top_p=0.7, generator=gen)
    assert set(drawn.tolist()) == set(keep.tolist())
    freq = torch.bincount(drawn, minlength=8).float() / len(drawn)
    expected = torch.zeros(8).index_put_((keep,), probs[keep] / probs[keep].sum())
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    both = sample_tokens(logits, temperature=2.0, top_k=4, top_p=0.5, generator=gen)
    assert set(both.tolist()) <= set(logits[0].topk(4).indices.tolist())
    assert sample_tokens(logits[:1], temperature=0).item() == 0
    assert set(sample_tokens(logits, top_p=1e-9, generator=gen).tolist()) == {0}


@pytest.mark.parametrize("top_k, top_p", [(None, None), (40, None), (None, 0.9), (10, 0.5)])
def test_samples_are_torch_multinomials_draws(top_k, top_p):
    """The exponential race (which a compiled step can run) draws exactly what torch.multinomial draws from the
    same generator state, over the same candidates."""
    logits = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)) / 0.8
    ours = sample_tokens(logits * 0.8, 0.8, top_k, top_p, torch.Generator().manual_seed(1))
    if top_k or top_p:
        values, indices = logits.topk(top_k) if top_k else logits.sort(-1, descending=True)
    else:
        values, indices = logits, torch.arange(4096).expand(64, -1)
    if top_p:
        probs = values.softmax(-1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    expected = indices.gather(-1, torch.multinomial(values.softmax(-1), 1, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(ours, expected.squeeze(-1))


def test_same_seed_same_text(model):
    settings = dict(max_new_tokens=30, temperature=1.0, top_k=40, top_p=0.95)
    first = model.generate(PROMPTS[:2], seed=7, **settings)
    assert [s.tokens for s in first] == [s.tokens for s in model.generate(PROMPTS[:2], seed=7, **settings)]
    assert [s.tokens for s in first] != [s.tokens for s in model.generate(PROMPTS[:2], seed=8, **settings)]


def test_a_row_stops_at_eos_while_others_go_on(model):
    ids = [model.tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS[:2]]
    free = [greedy_by_full_forward(model, p, 20) for p in ids]
    eos = free[0][3]  # pretend a token row 0 writes early is [EOS]
    stops = [row.index(eos) + 1 if eos in row else 20 for row in free]
    tokens, mask = left_pad(ids, pad=0)
    steps = torch.stack([t for t, _ in stream(model, tokens, mask, max_new_tokens=20, temperature=0, eos=eos)], 1)
    assert steps.shape[1] == max(stops) and stops[0] <= 4
    for row, stop in enumerate(stops):
        assert steps[row, :stop].tolist() == free[row][:stop] and set(steps[row, stop:].tolist()) <= {eos}


def test_hooks_steer_and_record_during_generation(model):
    recorded = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: recorded.append(t.shape[1]))]):
        sample = model.generate(PROMPTS[1], max_new_tokens=6, temperature=0, stop_at_eos=False)[0]
    assert recorded == [len(sample.prompt_tokens)] + [1] * 5  # the prompt once, then one position per step
    with torch.no_grad():  # what each token's direction alone predicts; steer with the most decisive one
        every_direction = model.tokens_to_residual_directions(torch.arange(model.cfg.d_vocab))
        top2 = model.ln_final(every_direction).matmul(model.W_E.T).topk(2)
    margin = (top2.values[:, 0] - top2.values[:, 1]) / top2.values[:, 0].abs()
    direction, target = model.tokens_to_residual_directions(margin.argmax()), top2.indices[margin.argmax(), 0].item()
    assert margin.max() > 1e-2  # the stream below is that direction to within 1e-4, far inside this margin

    def steer(resid, hook):  # overwhelm the last residual stream with one token's direction
        return resid + 1e4 * resid.norm(dim=-1, keepdim=True) * direction / direction.norm()

    with model.hooks(fwd_hooks=[(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", steer)]):
        steered = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0, stop_at_eos=False)[0]
        assert steered.tokens == greedy_by_full_forward(model, steered.prompt_tokens, 20)  # hooked as a forward is
    plain = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0, stop_at_eos=False)[0]
    assert plain.tokens == greedy_by_full_forward(model, plain.prompt_tokens, 20)  # the hook is gone
    assert set(steered.tokens) == {target} and len(set(plain.tokens)) > 1


def test_length_rule_and_bad_settings(model):
    n_ctx = model.cfg.n_ctx
    near_full = random_tokens(1, n_ctx - 3, 1024)[0].tolist()
    assert len(model.generate([near_full], max_new_tokens=10, temperature=0, stop_at_eos=False)[0].tokens) == 3
    with pytest.raises(SSLensError, match=f"the prompt is {n_ctx} tokens; the context is {n_ctx}"):
        model.generate([random_tokens(1, n_ctx, 1024)[0].tolist()])
    with pytest.raises(SSLensError, match="empty prompt"):
        model.generate("")
    with pytest.raises(SSLensError, match="top_p must be in"):
        model.generate("a", top_p=0)
    with pytest.raises(SSLensError, match="temperature must be >= 0"):
        model.generate("a", temperature=-1)
    assert model.generate("ça, über — 日本", max_new_tokens=3, temperature=0)[0].prompt_tokens  # [UNK], not a crash


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(num_samples=0), "num_samples must be >= 1, got 0"),
        (dict(num_samples=-2), "num_samples must be >= 1, got -2"),
        (dict(temperature=float("inf")), r"temperature must be >= 0 and finite \(0 = greedy\), got inf"),
        (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=float("nan")), "top_p must be in"),
        (dict(top_k=0), "top_k must be >= 1, got 0"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ],
)
def test_settings_without_meaning_are_refused(small_model, setting, message):
    """The Python API refuses what the CLI refuses (generate.check_settings), before a token is drawn."""
    with pytest.raises(SSLensError, match=message):
        small_model.generate([[5, 6, 7]], **{"max_new_tokens": 2, **setting})


def sslens(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "sslens", *args], capture_output=True, text=True, **kwargs)


def test_cli_prompt_and_json(model, tiny_run):
    r = sslens(
        "generate", str(tiny_run), "--prompt", "once upon a time", "--temperature", "0", "--max_new_tokens", "20"
    )
    expected = model.generate("once upon a time", max_new_tokens=20, temperature=0)[0]
    assert r.returncode == 0 and r.stdout == "once upon a time" + expected.text + "\n"
    r = sslens(
        "generate",
        str(tiny_run),
        "--prompt",
        "once upon a time",
        "--temperature",
        "0",
        "--max_new_tokens",
        "20",
        "--compile",
    )
    assert r.returncode == 0 and r.stdout == "once upon a time" + expected.text + "\n"
    r = sslens(
        "generate",
        str(tiny_run),
        "--step",
        "64",
        "--prompt",
        "the dog",
        "--json",
        "--seed",
        "1",
        "--top_k",
        "10",
        "--num_samples",
        "2",
        "--max_new_tokens",
        "8",
    )
    rows = json.loads(r.stdout)
    old = load_model(tiny_run, step=64).generate("the dog", max_new_tokens=8, top_k=10, seed=1, num_samples=2)
    assert [row["tokens"] for row in rows] == [s.tokens for s in old]
    assert all(row["logprobs"] == pytest.approx(s.logprobs, abs=1e-5) for row, s in zip(rows, old))
    assert rows[0]["token_strings"] == [model.tokenizer.id_to_token(t) for t in old[0].tokens]
    r = sslens(
        "generate",
        str(tiny_run / "checkpoints" / "step_0000064"),
        "--prompt",
        "the dog",
        "--json",
        "--seed",
        "1",
        "--top_k",
        "10",
        "--num_samples",
        "2",
        "--max_new_tokens",
        "8",
    )  # a checkpoint directory as MODEL
    assert [row["tokens"] for row in json.loads(r.stdout)] == [s.tokens for s in old]
    r = sslens("generate", str(tiny_run), "--prompt", "")
    assert r.returncode == 2 and r.stderr == "sslens: error: empty prompt: give at least one word\n"


def test_cli_reads_an_hf_directory(model, tmp_path):
    model.save_hf(tmp_path / "hf")
    r = sslens("generate", str(tmp_path / "hf"), "--prompt", "mia", "--temperature", "0", "--max_new_tokens", "12")
    assert (
        r.returncode == 0 and r.stdout == "mia" + model.generate("mia", max_new_tokens=12, temperature=0)[0].text + "\n"
    )


def test_interactive_ctrl_c_stops_the_story_not_the_session(model, monkeypatch, capsys):
    import builtins

    import sslens.generate
    from sslens.cli import interactive

    def interrupted_story(*args, **kwargs):
        yield " the first words"
        raise KeyboardInterrupt

    answers = iter(["once", "mia"])

    def typed(prompt):
        if (answer := next(answers, None)) is None:
            raise KeyboardInterrupt  # Ctrl-C at the prompt ends the session
        return answer

    monkeypatch.setattr(builtins, "input", typed)
    monkeypatch.setattr(sslens.generate, "stream_text", interrupted_story)
    interactive(model, {"max_new_tokens": 5}, None)
    assert capsys.readouterr().out == "once the first words [stopped]\n\nmia the first words [stopped]\n\n\n"


@pytest.mark.parametrize("compile", [[], ["--compile"]], ids=["eager", "compiled"])
def test_interactive_from_stdin(model, tiny_run, compile):
    r = sslens(
        "generate",
        str(tiny_run),
        "--temperature",
        "0",
        "--max_new_tokens",
        "15",
        *compile,
        input="once upon a time\nmia\n\nnever read\n",
    )
    assert r.returncode == 0, r.stderr
    stories = [p + model.generate(p, max_new_tokens=15, temperature=0)[0].text for p in ("once upon a time", "mia")]
    assert r.stdout == "".join(f"> {s}\n\n" for s in stories) + "> "


def test_interactive_in_a_terminal_streams_and_quits_on_ctrl_d(model, tiny_run):
    pid, fd = pty.fork()
    if pid == 0:  # the child: sslens on a pseudo-terminal
        os.execv(
            sys.executable,
            [sys.executable, "-m", "sslens", "generate", str(tiny_run), "--temperature", "0", "--max_new_tokens", "15"],
        )
    expected = model.generate("once upon a time", max_new_tokens=15, temperature=0)[0].text.strip()
    out = read_until(fd, "> ")
    os.write(fd, b"once upon a time\n")
    out += read_until(fd, expected + "\r\n\r\n> ")
    os.write(fd, b"\x04")  # Ctrl-D
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and "Traceback" not in out


def read_until(fd: int, text: str, timeout: float = 60) -> str:
    out, deadline = "", time.time() + timeout
    while text not in out:
        assert time.time() < deadline, f"no {text!r} in {out!r}"
        if select.select([fd], [], [], 0.1)[0]:
            out += os.read(fd, 4096).decode()
    return out


def test_compiled_steps_give_the_eager_tokens(model):
    """compile=True: the greedy tokens and log-probs of the eager steps, alone and as a left-padded batch; a hook
    attached afterwards still applies (the steps then run eagerly); one-row projections avoid BLAS."""
    for prompts in ([PROMPTS[0]], PROMPTS):
        eager = model.generate(prompts, max_new_tokens=30, temperature=0, stop_at_eos=False)
        compiled = model.generate(prompts, max_new_tokens=30, temperature=0, stop_at_eos=False, compile=True)
        assert [s.tokens for s in compiled] == [s.tokens for s in eager]
        assert all(c.logprobs == pytest.approx(e.logprobs, abs=1e-4) for c, e in zip(compiled, eager))
    sampled = [
        model.generate(PROMPTS[1], max_new_tokens=20, top_k=10, seed=4, compile=c)[0].tokens for c in (False, True)
    ]
    assert sampled[0] == sampled[1]

    with torch.inference_mode():
        cache = KVCache(model.cfg, 1)
        model(torch.tensor([[5, 9, 200]]), past_kv_cache=cache)
        step = step_function(model, compile=True)
        assert not isinstance(step, functools.partial)  # compiled
        step(torch.tensor([[7]]), cache, 0, None, None, None)
        with torch.profiler.profile() as prof:
            step(torch.tensor([[8]]), cache, 0, None, None, None)
    assert "aten::mm" not in {event.key for event in prof.key_averages()}

    handle = model.blocks[0].mlp.down_proj.register_forward_hook(lambda module, args, out: out)  # a plain torch hook
    assert isinstance(step_function(model, compile=True), functools.partial)  # eager
    handle.remove()
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=[(last, lambda resid, hook: resid * 0)]):  # zero logits: argmax is token 0
        assert (
            model.generate(PROMPTS[0], max_new_tokens=5, temperature=0, stop_at_eos=False, compile=True)[0].tokens
            == [0] * 5
        )
    assert (
        model.generate(PROMPTS[0], max_new_tokens=5, temperature=0, stop_at_eos=False, compile=True)[0].tokens
        == eager[0].tokens[:5]
    )
    edited = copy.deepcopy(model)  # a copy runs its own weights, not the compiled step of the model it copies
    with torch.no_grad():
        edited.ln_final.w.zero_()  # zero logits: argmax is token 0
    assert (
        edited.generate(PROMPTS[0], max_new_tokens=5, temperature=0, stop_at_eos=False, compile=True)[0].tokens
        == [0] * 5
    )
