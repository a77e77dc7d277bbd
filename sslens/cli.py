"""`sslens ...`: parse arguments, call the Python API, print. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import CARD_PROBE_STORIES, DEFAULT_PROBE_HOOKS, parse_overrides, preset_names
from .errors import SSLensError


def cmd_model(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch

    from .model import HookedLlama

    model = HookedLlama.from_preset(args.config, seed=args.seed, **parse_overrides(overrides)).eval()
    cfg = model.cfg
    print(f"{cfg.model_name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print("  " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    tokens = torch.randint(0, cfg.d_vocab, (1, min(16, cfg.n_ctx)), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens)
    print(f"run_with_cache on {tokens.shape[1]} random tokens: logits {tuple(logits.shape)}, {len(cache)} activations")
    for name in [n for n in cache if not n.startswith("blocks.") or n.startswith("blocks.0.")]:
        print(f"  {name:<34} {tuple(cache[name].shape)}")
    print(f"  ... the same for blocks.1 to blocks.{cfg.n_layers - 1}" if cfg.n_layers > 1 else "")
    if args.export:
        model.save_hf(args.export)
        print(f"wrote an HF LlamaForCausalLM directory to {args.export}")


def cmd_bench(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch

    from .bench import (
        as_json,
        bench_data,
        bench_suite,
        bench_train,
        check_device,
        format_data,
        format_rows,
        format_suite,
        train_dtypes,
    )

    _no_extra(overrides)
    torch.manual_seed(0)
    if args.suite == "data":
        result = bench_data(args.stories)
        print(format_data(result))
        return _write_json(args.json, result)
    check_device(args.device)
    where = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    header = (
        f"{args.preset}, batch {args.batch} x {args.seq} tokens, {where}, median of "
        f"{2 if args.quick else args.reps} interleaved runs"
    )
    if args.suite == "train":
        rows = bench_train(
            (args.preset,),
            args.batch,
            args.seq,
            2 if args.quick else args.reps,
            train_dtypes(args.device),
            compiled=(False,) if args.quick else (False, True),
            device=args.device,
        )
        result = as_json(rows)
        print(format_rows(rows, header))
    else:
        rows, extras = bench_suite(args.preset, args.batch, args.seq, args.reps, args.device, args.quick)
        result = as_json(rows) | extras
        print(format_suite(rows, extras, header))
    _write_json(args.json, result)


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    from .generate import check_settings

    _no_extra(overrides)
    check_settings(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples)
    import torch  # the model's imports (TransformerLens's among them) take seconds: bad settings are refused first

    from .checkpoint import load_model

    model = load_model(args.model, step=args.step)
    if model.tokenizer is None:
        raise SSLensError(f"{args.model} has no tokenizer.json, so it cannot read a prompt")
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        compile=args.compile,
    )
    if args.prompt is None:
        generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
        return interactive(model, settings, generator)
    samples = model.generate(args.prompt, seed=args.seed, num_samples=args.num_samples, **settings)
    if args.json:
        tok = model.tokenizer
        print(
            json.dumps(
                [
                    {
                        "prompt": args.prompt,
                        "prompt_tokens": s.prompt_tokens,
                        "tokens": s.tokens,
                        "token_strings": [tok.id_to_token(t) for t in s.tokens],
                        "text": s.text,
                        "logprobs": s.logprobs,
                    }
                    for s in samples
                ],
                indent=1,
            )
        )
    else:
        print("\n\n".join(args.prompt + s.text for s in samples))


def cmd_probe(args: argparse.Namespace, overrides: list[str]) -> None:
    from pathlib import Path

    from .probe import format_results, load_labelled, probe_steps, training_data, write_results

    _no_extra(overrides)
    data = args.data or training_data(args.model)
    if data is None:
        raise SSLensError(f"{args.model} is not a run directory; name the labelled stories with --data")
    steps = _steps(args.steps)
    stories, labels = load_labelled(data, args.label, args.split, args.max_stories, args.seed)
    hooks = [h for h in args.hooks.split(",") if h]
    results = probe_steps(
        args.model, steps, stories, labels, hooks, args.pool, args.seed, args.batch_size, progress=True
    )
    out = Path(args.out or Path("probes") / f"{Path(args.model).resolve().name}-{args.label}-{args.pool}")
    paths = write_results(
        results,
        out,
        {
            "model": str(args.model),
            "data": str(data),
            "split": args.split,
            "label": args.label,
            "pool": args.pool,
            "stories": len(stories),
            "seed": args.seed,
        },
    )
    print(format_results(results))
    print("wrote " + ", ".join(str(p) for p in paths))


def _steps(text: str | None) -> list[int] | str | None:
    if text in (None, "all"):
        return text
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise SSLensError(f"--steps takes 'all' or step numbers like 0,64,1024, not {text!r}") from None


def _checkpoint_arguments(parser: argparse.ArgumentParser, steps_do: str) -> None:
    """--step and --steps, which `_requested` reads; `steps_do`: what --steps gives."""
    parser.add_argument("--step", type=int, help="a run's checkpoint step (default: the newest)")
    parser.add_argument("--steps", help=f"'all' (every checkpoint of a run) or steps like 0,64,1024: {steps_do}")


def _requested(args: argparse.Namespace) -> list[int] | str | None:
    """The checkpoints a command's --step or --steps asks for (never both): "all", a list, or None (the newest)."""
    if args.step is not None and args.steps:
        raise SSLensError("give --step N or --steps, not both")
    return _steps(args.steps) or ([args.step] if args.step is not None else None)


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from pathlib import Path

    from .fileio import atomic_write_text
    from .runcard import cards_figure, cards_table, evaluate, evaluate_steps

    _no_extra(overrides)
    steps = _requested(args) if args.steps else None
    cards = (
        evaluate_steps(args.model, steps, args.data, args.probe_stories, progress=True)
        if steps
        else [evaluate(args.model, args.step, args.data, args.probe_stories)]
    )
    print(cards_table(cards) if steps else cards[0].markdown())
    if args.json:
        _write_json(args.json, [c.to_dict() for c in cards] if steps else cards[0].to_dict())
    if steps:
        plot = Path(args.plot or Path("evals") / f"{Path(args.model).resolve().name}.html")
        plot.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            plot, cards_figure(cards, f"run card against step, {args.model}").to_html(include_plotlyjs=True)
        )
        print(f"wrote {plot}")
    if args.export:
        from .checkpoint import load_model

        load_model(args.model, cards[-1].step if steps else args.step).save_hf(args.export, card=cards[-1].markdown())
        print(f"wrote an HF LlamaForCausalLM directory with this card as its README.md to {args.export}")


def cmd_patch(args: argparse.Namespace, overrides: list[str]) -> None:
    from .checkpoint import load_model
    from .pairs import SLOT_FACTORS, check_factor, pairs, read_pairs
    from .patching import SWEEP_GROUPS, format_results, patch_steps, write_results

    _no_extra(overrides)
    check_factor(args.factor)
    if args.factor not in SLOT_FACTORS:
        raise SSLensError(f"patching needs token-aligned pairs: a slot factor ({', '.join(SLOT_FACTORS)})")
    steps = _requested(args)
    model = load_model(args.model, args.step)
    if args.pairs:
        rows = read_pairs(args.pairs, model.tokenizer)
    else:
        rows = pairs(args.factor, args.n, args.seed, model.tokenizer, max_tokens=model.cfg.n_ctx)
    results = patch_steps(args.model, steps, rows, SWEEP_GROUPS[args.sweep], args.method, progress=True)
    out = Path(args.out or Path("patching") / f"{Path(args.model).resolve().name}-{rows[0]['factor']}-{args.method}")
    factor = rows[0]["factor"]
    settings = {"model": str(args.model), "factor": factor, "pairs": len(rows), "source": args.pairs or args.seed}
    paths = write_results(results, out, settings | {"method": args.method, "sweep": args.sweep})
    print(format_results(results))
    print(f"patched {len(rows)} {factor} pairs; wrote " + ", ".join(str(p) for p in paths))


def cmd_lens_train(args: argparse.Namespace, overrides: list[str]) -> None:
    import pandas as pd

    from .tuned_lens import EVAL_FILE, format_evaluation, train_lenses

    _no_extra(overrides)
    steps = _requested(args)
    for path in train_lenses(args.model, steps, args.tokens, args.data, progress=True):
        print(f"{path}:\n" + format_evaluation(pd.read_csv(path / EVAL_FILE)))


def cmd_sae(args: argparse.Namespace, overrides: list[str]) -> None:
    import pandas as pd

    from .feature_steps import format_births
    from .features import train_saes
    from .sae import read_eval

    _no_extra(overrides)
    steps = _requested(args)
    settings = {"d_sae": args.width, "k": args.k, "arch": args.arch, "tokens": args.tokens, "seed": args.seed}
    settings["hook_name_out"] = args.hook_out or ""
    if args.l1 is not None:
        settings["l1_coefficient"] = args.l1
    paths = train_saes(
        args.model,
        args.hook,
        steps,
        args.data,
        args.out,
        True,
        args.name_stories,
        not args.no_probes,
        args.store,
        **settings,
    )
    print("| SAE | mse | fvu | L0 | dead | dense | CE loss recovered |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        e = read_eval(path)
        print(f"| {path} | {e.mse:.4g} | {e.fvu:.3f} | {e.l0:.1f} | {e.dead} | {e.dense} | {e.ce_recovered:.3f} |")
    if (births := paths[0].parent / "births.csv").is_file():
        print(format_births(pd.read_csv(births)) + f"\nwrote {births} and the rest of features across steps beside it")


def interactive(model, settings: dict, generator) -> None:
    """Interactive generation: read a prompt, stream its story, repeat. An empty line or Ctrl-D quits;
    Ctrl-C stops the story being written (and quits at the prompt)."""
    from .generate import stream_text

    print("Type the start of a story. Empty line or Ctrl-D: quit; Ctrl-C: stop a story.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not prompt.strip():
            return
        print(prompt, end="", flush=True)
        try:
            for piece in stream_text(model, prompt, generator=generator, **settings):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print("\n")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from .config import ModelConfig, load_train_config, settable_fields

    values = parse_overrides(overrides)
    model_cfg, cfg = load_train_config(args.config, **values)
    from .train import fine_tuning_config, train  # after the config is checked: its errors come at once, not in 3 s

    if cfg.init_from:  # the source's shape, with the model keys given on the command line
        model_keys = {f.name for f in settable_fields(ModelConfig)}
        model_cfg = fine_tuning_config(cfg, **{k: v for k, v in values.items() if k in model_keys})
    start = time.perf_counter()
    run_dir = train(model_cfg, cfg)
    print(run_summary(run_dir, cfg.max_steps, time.perf_counter() - start))


def run_summary(run_dir, max_steps: int, seconds: float) -> str:
    """The line a finished run ends with: steps, time, the last training and validation loss, the checkpoints."""
    from .checkpoint import read_metrics
    from .train import duration

    records = read_metrics(run_dir / "metrics.jsonl")[0]
    losses = ""
    for key, name in (("loss", "train loss"), ("val_loss", "validation loss")):
        last = next((r[key] for r in reversed(records) if key in r), None)
        losses += f", final {name} {last:.4f}" if last is not None else ""
    return f"finished {max_steps} steps in {duration(seconds)}{losses}; checkpoints in {run_dir / 'checkpoints'}"


def train_keys_help() -> str:
    import dataclasses

    from .config import ModelConfig, TrainConfig, settable_fields

    lines = ["training keys (--key=value; defaults in brackets):"]
    lines += [f"  {f.name:<20} {f.metadata['help']} [{f.default!r}]" for f in dataclasses.fields(TrainConfig)]
    lines += [
        "",
        "model keys (the preset's values unless overridden): "
        + ", ".join(f.name for f in settable_fields(ModelConfig)),
    ]
    return "\n".join(lines)


def cmd_data_synth(args: argparse.Namespace, overrides: list[str]) -> None:
    from .synth import write_parquet

    _no_extra(overrides)
    start = time.perf_counter()
    path = write_parquet(args.out, args.n, args.seed)
    print(f"wrote {args.n:,} stories to {path} ({args.n / (time.perf_counter() - start):,.0f} stories/s)")


def cmd_data_pairs(args: argparse.Namespace, overrides: list[str]) -> None:
    from .pairs import SLOT_FACTORS, check_factor, pairs, write_pairs

    _no_extra(overrides)
    check_factor(args.factor, args.value)
    tok = source_tokenizer(args.tokenizer) if args.factor in SLOT_FACTORS else None
    start = time.perf_counter()
    rows = pairs(args.factor, args.n, args.seed, tok, args.value)
    path = write_pairs(args.out, rows)
    print(f"wrote {len(rows):,} {args.factor} pairs to {path} in {time.perf_counter() - start:.1f} s")


def source_tokenizer(source: str):
    """The tokenizer of a run or model directory (its tokenizer.json), or a tokenizer.json file."""
    from .tokenizer import load_tokenizer

    path = Path(source)
    if not path.exists():
        raise SSLensError(f"no tokenizer at {path}: pass --tokenizer RUN_DIR or a tokenizer.json file")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise SSLensError(f"{path} has no tokenizer.json; pass --tokenizer RUN_DIR or a tokenizer.json file")
        path = path / "tokenizer.json"
    return load_tokenizer(path)


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from .data import load_stories
    from .tokenizer import save_tokenizer, train_tokenizer

    _no_extra(overrides)
    stories = load_stories(args.data, "train")
    tok = train_tokenizer(stories["story"], args.vocab_size)
    save_tokenizer(tok, args.out)
    print(f"trained a {tok.get_vocab_size():,}-token WordPiece tokenizer on {len(stories):,} stories; wrote {args.out}")


def _no_extra(overrides: list[str]) -> None:
    if overrides:
        raise SSLensError(f"unknown option {overrides[0]}")


class ShowDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (
            any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or "default" in help
            or not action.option_strings
        ):
            return help
        return f"{help} (default: %(default)s)".lstrip()


class TrainHelp(ShowDefaults, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog (the table of config keys) printed as written."""


class Parser(argparse.ArgumentParser):
    """A parser whose help shows defaults; argparse builds subcommands' parsers of the same class."""

    def __init__(self, *args, formatter_class: type = ShowDefaults, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="sslens", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "model",
        help="build a model from a preset or YAML, show its config and hooks, optionally export it",
        description="Extra --key=value arguments override config keys, e.g. --n_layers=2.",
    )
    m.add_argument("config", help=f"preset ({', '.join(preset_names())}) or YAML path")
    m.add_argument("--seed", type=int, default=0, help="seeds the initial weights")
    m.add_argument("--export", metavar="DIR", help="write an HF LlamaForCausalLM directory")
    m.set_defaults(run=cmd_model)
    tr = sub.add_parser(
        "train",
        help="train a model: sslens train CONFIG [--key=value ...]",
        formatter_class=TrainHelp,
        epilog=train_keys_help(),
        description="Train from a preset or YAML; every config key can be overridden as --key=value, "
        "e.g. sslens train 5M --data=synth --max_steps=200 --compile=False.",
    )
    tr.add_argument("config", help=f"preset ({', '.join(preset_names())}) or YAML path")
    tr.set_defaults(run=cmd_train)
    g = sub.add_parser(
        "generate",
        help="write stories: interactive, or continue --prompt and exit",
        description="Sample with a KV cache. Without --prompt: type a prompt, watch the story stream; an "
        "empty line or Ctrl-D quits, Ctrl-C stops a story. Prompt + new tokens stay "
        "within the model's context (n_ctx).",
    )
    g.add_argument(
        "model", help="a run directory (newest checkpoint, or --step), a checkpoint directory, or an HF Llama directory"
    )
    g.add_argument("--prompt", help="continue this text, print and exit")
    g.add_argument("--max_new_tokens", type=int, default=200, help="tokens to add (cut to what fits in n_ctx)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top_k", type=int, help="sample among the k most likely tokens (default: all)")
    g.add_argument(
        "--top_p", type=float, help="sample among the most likely tokens whose probability reaches p (default: off)"
    )
    g.add_argument("--seed", type=int, help="the same seed gives the same stories (default: unseeded)")
    g.add_argument("--step", type=int, help="a run's checkpoint step (default: the newest)")
    g.add_argument("--num_samples", type=int, default=1, help="continuations of --prompt, sampled as one batch")
    g.add_argument("--json", action="store_true", help="print tokens, text and per-token log-probs as JSON")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the one-token step: ~10 s to compile once, then on CPU at batch 1 a 5M step takes ~0.6 ms "
        "instead of ~1.6 ms, 4.5-4.8x HF generate (BENCHMARKS.md)",
    )
    g.set_defaults(run=cmd_generate)
    pr = sub.add_parser(
        "probe",
        help="linear probes: where (and when in training) a story label is decodable",
        description="For each hook (and checkpoint): a multinomial logistic-regression probe on pooled "
        "activations, its accuracy, macro-F1, majority baseline and a control task. Writes "
        "results.csv, results.json and accuracy.html.",
    )
    pr.add_argument("model", help="a run directory, a checkpoint directory, or an HF Llama directory")
    pr.add_argument(
        "--data",
        metavar="SRC",
        help="labelled stories: synth, synth:N, a hub dataset or a file (default: the run's training data)",
    )
    pr.add_argument("--label", required=True, help="the label column, e.g. theme, topic, style, feature")
    pr.add_argument("--hooks", default=",".join(DEFAULT_PROBE_HOOKS), help="comma-separated hook names or globs")
    pr.add_argument(
        "--pool",
        choices=["mean", "last"],
        default="mean",
        help="a story's vector: mean over its tokens, or its last token",
    )
    pr.add_argument("--steps", help="'all' (every checkpoint of a run) or steps like 0,64,1024 (default: the newest)")
    pr.add_argument("--max_stories", type=int, default=5000, help="a random sample of this many stories")
    pr.add_argument("--split", default="train", help="the data split to read")
    pr.add_argument("--batch_size", type=int, default=32, help="stories per forward pass")
    pr.add_argument("--seed", type=int, default=0, help="story sample, splits and control labels")
    pr.add_argument("--out", metavar="DIR", help="output directory (default: probes/MODEL-LABEL-POOL)")
    pr.set_defaults(run=cmd_probe)
    ev = sub.add_parser(
        "eval",
        help="the run card: validation loss, induction, name copying, theme probe, greedy text",
        description="What to check first about a model, on held-out stories: a run's own validation "
        "stories, otherwise the test split of --data. Name copying needs the embedded "
        "corpus (synth); the theme probe a theme column.",
    )
    ev.add_argument("model", help="a run directory, a checkpoint directory, an HF Llama directory or a hub name")
    _checkpoint_arguments(ev, "a table and a figure")
    ev.add_argument("--data", metavar="SRC", help="stories for a model without a run directory (default: synth)")
    ev.add_argument(
        "--probe_stories",
        type=int,
        default=CARD_PROBE_STORIES,
        help="stories for name copying and the theme probe (the embedded corpus adds fresh ones)",
    )
    ev.add_argument("--json", metavar="FILE", help="also write the card(s) as JSON")
    ev.add_argument("--plot", metavar="FILE.html", help="with --steps: the figure (default: evals/MODEL.html)")
    ev.add_argument(
        "--export", metavar="DIR", help="write the checkpoint as an HF directory whose README.md is this card"
    )
    ev.set_defaults(run=cmd_eval)
    pt = sub.add_parser(
        "patch",
        help="activation or attribution patching on counterfactual story pairs",
        description="Which components carry a story slot (the hero's name, ...) to where it is recalled: the "
        "run's corrupt pairs with clean activations patched in, by layer, head and position role, normalised "
        "so 0 is the corrupt run and 1 the clean one. Writes results.csv, results.json and index.html.",
    )
    pt.add_argument("model", help="a run directory (or a checkpoint or HF directory)")
    pt.add_argument("--factor", default="name", help="name, friend, pronoun, object, creature or place")
    pt.add_argument("--n", type=int, default=64, help="number of pairs")
    pt.add_argument("--pairs", metavar="FILE.parquet", help="pairs from 'sslens data pairs' instead (this tokenizer)")
    pt.add_argument("--seed", type=int, default=0, help="the corpus seed the pairs' stories come from")
    pt.add_argument("--sweep", default="heads", choices=["heads", "resid", "attn", "mlp", "all"], help="components")
    pt.add_argument("--method", default="activation", choices=["activation", "attribution"], help="how")
    _checkpoint_arguments(pt, "the effects against training step")
    pt.add_argument("--out", metavar="DIR", help="default: patching/RUN-FACTOR-METHOD")
    pt.set_defaults(run=cmd_patch)
    sa = sub.add_parser(
        "sae",
        help="sparse autoencoders on a hook, per checkpoint, in SAELens's file layout",
        description="Train a TopK (or ReLU + L1) sparse autoencoder on one hook's activations over the run's "
        "own stories, evaluate it on held-out stories (MSE, fraction of variance unexplained, L0, dead and dense "
        "latents, CE loss recovered), and save it in SAELens's layout (cfg.json, sae_weights.safetensors) under "
        "MODEL/saes/HOOK/ARCH-WIDTH[-kK]/step_N. With --steps each SAE starts from the previous one's weights.",
    )
    sa.add_argument("model", help="a run directory (or a checkpoint or HF directory)")
    sa.add_argument("--hook", required=True, help="e.g. blocks.1.hook_resid_post, blocks.0.hook_mlp_out")
    sa.add_argument("--width", type=int, default=4096, help="latents")
    sa.add_argument("--k", type=int, default=32, help="topk: latents active per token")
    sa.add_argument("--arch", default="topk", help="topk or relu")
    sa.add_argument("--l1", type=float, help="relu: the L1 coefficient (default 1.0)")
    sa.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    _checkpoint_arguments(sa, "one SAE per checkpoint, warm-started")
    sa.add_argument("--data", metavar="SRC", help="stories for a model without a run directory (default: synth)")
    sa.add_argument("--seed", type=int, default=0, help="initialisation, window order and shuffling")
    sa.add_argument("--name_stories", type=int, default=CARD_PROBE_STORIES, help="labelled stories to name latents")
    sa.add_argument(
        "--hook_out",
        metavar="HOOK",
        help="train a transcoder: read --hook, reconstruct this hook "
        "(e.g. --hook blocks.2.ln2.hook_normalized --hook_out blocks.2.hook_mlp_out: the MLP)",
    )
    sa.add_argument(
        "--store",
        choices=["fp32", "bf16"],
        help="store the activations on disk once (under $SSLENS_CACHE) and reuse them for other widths and k",
    )
    sa.add_argument(
        "--no_probes", action="store_true", help="skip the linear probe per label beside the latents (~5 s a label)"
    )
    sa.add_argument("--out", metavar="DIR", help="root of the saes/ tree (default: the model's directory)")
    sa.set_defaults(run=cmd_sae)
    b = sub.add_parser(
        "bench",
        help="model: speed vs HF LlamaForCausalLM and TransformerBridge, as ratios; "
        "data: the embedded corpus and token pipeline",
    )
    b.add_argument(
        "--suite",
        choices=["model", "train", "data"],
        default="model",
        help="model: every row below; train: the training rows of --preset alone; data: the corpus pipeline",
    )
    b.add_argument("--stories", type=int, default=100_000, help="data suite: corpus size")
    b.add_argument("--preset", default="5M", help="the model of the train suite")
    b.add_argument("--batch", type=int, default=8, help="sequences per training and forward row")
    b.add_argument("--seq", type=int, default=512, help="their length in tokens")
    b.add_argument("--reps", type=int, default=7, help="repetitions per row (the ratio is their median)")
    b.add_argument(
        "--quick",
        action="store_true",
        help="two repetitions, shorter generation, no compiled training (about 2 min on 2 CPU cores)",
    )
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda adds bf16 training rows")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    b.set_defaults(run=cmd_bench)
    d = sub.add_parser("data", help="the embedded story corpus").add_subparsers(dest="data_command", required=True)
    syn = d.add_parser("synth", help="generate labelled stories in the SimpleStories schema (21 columns) as parquet")
    syn.add_argument("--n", type=int, default=10_000, help="number of stories")
    syn.add_argument("--seed", type=int, default=0, help="the same seed and n give the same stories")
    syn.add_argument("--out", required=True, metavar="FILE.parquet", help="where to write them")
    syn.set_defaults(run=cmd_data_synth)
    pp = d.add_parser(
        "pairs",
        help="counterfactual story pairs that differ in one factor (token-aligned prompts for a slot factor)",
    )
    pp.add_argument(
        "--factor",
        required=True,
        help="name, friend, pronoun, object, creature, place (slots); "
        "theme, topic, style, feature, grammar, persona (labels)",
    )
    pp.add_argument("--value", help="a label factor's counterfactual value (default: another one drawn per pair)")
    pp.add_argument("--n", type=int, default=256, help="number of pairs")
    pp.add_argument("--seed", type=int, default=0, help="the corpus seed: pair i comes from one of its stories")
    pp.add_argument(
        "--tokenizer",
        default="runs/quickstart",
        metavar="RUN|FILE",
        help="slot factors: the tokenizer the pairs are aligned under (a run directory or a tokenizer.json)",
    )
    pp.add_argument("--out", required=True, metavar="FILE.parquet", help="where to write them")
    pp.set_defaults(run=cmd_data_pairs)
    ln = sub.add_parser("lens", help="tuned lenses").add_subparsers(dest="lens_command", required=True)
    lt = ln.add_parser(
        "train",
        help="train a tuned lens per checkpoint and compare it with the logit lens",
        description="For each layer an affine translator, trained with the model frozen so that the final norm and "
        "unembedding of the translated residual match the model's final distribution (KL), on the run's own "
        "stories; evaluated on held-out stories (KL to the final distribution and next-token CE, logit vs tuned "
        "lens) and saved in RUN/lenses/step_N with lens_eval.csv.",
    )
    lt.add_argument("model", help="a run directory (or a checkpoint or HF directory)")
    _checkpoint_arguments(lt, "a lens per checkpoint")
    lt.add_argument("--tokens", type=int, default=262_144, help="training tokens per lens")
    lt.add_argument("--data", metavar="SRC", help="stories for a model without a run directory (default: synth)")
    lt.set_defaults(run=cmd_lens_train)
    t = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer_command", required=True)
    tt = t.add_parser("train", help="train the SimpleStories WordPiece recipe on a story source")
    tt.add_argument(
        "--data",
        required=True,
        metavar="SRC",
        help="synth, synth:N, a hub dataset, or a .parquet/.jsonl/.json/.txt path",
    )
    tt.add_argument("--vocab_size", "--vocab-size", type=int, default=4096, help="tokens, specials included")
    tt.add_argument("--out", required=True, metavar="tokenizer.json", help="where to write it")
    tt.set_defaults(run=cmd_tokenizer_train)
    return p


def main(argv: list[str] | None = None) -> None:
    args, extra = parser().parse_known_args(argv)
    try:
        args.run(args, extra)
    except SSLensError as e:
        sys.stderr.write(f"sslens: {e.prefix}{e}\n")  # one write: torchrun's ranks share the stream
        sys.exit(e.exit_code)
    except OSError as e:  # a path the user gave: missing directory, no permission, disk full
        print(f"sslens: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
