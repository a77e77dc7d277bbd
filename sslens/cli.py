"""`sslens ...`: parse arguments, call the Python API, print. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import parse_overrides, preset_names
from .errors import SSLensError


def cmd_model(args: argparse.Namespace, overrides: list[str]) -> None:
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
    from .bench import as_json, bench_model, format_rows

    if overrides:
        raise SSLensError(f"unknown option {overrides[0]}")
    torch.manual_seed(0)
    rows = bench_model(args.preset, args.batch, args.seq, args.reps)
    print(format_rows(rows, f"{args.preset}, batch {args.batch} x {args.seq} tokens, fp32, CPU, "
                            f"{torch.get_num_threads()} threads, median of {args.reps} interleaved runs"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(as_json(rows), f, indent=2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslens", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="build a model from a preset or YAML, show its config and hooks, optionally export it",
                       description="Extra --key=value arguments override config keys, e.g. --n_layers=2.")
    m.add_argument("config", help=f"preset ({', '.join(preset_names())}) or YAML path")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--export", metavar="DIR", help="write an HF LlamaForCausalLM directory")
    m.set_defaults(run=cmd_model)
    b = sub.add_parser("bench", help="speed vs HF LlamaForCausalLM and TransformerBridge, as ratios")
    b.add_argument("--preset", default="5M")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=512)
    b.add_argument("--reps", type=int, default=7)
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    b.set_defaults(run=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    args, extra = parser().parse_known_args(argv)
    try:
        args.run(args, extra)
    except SSLensError as e:
        print(f"sslens: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
