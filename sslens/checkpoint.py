"""Run directories and checkpoints: the schedule, atomic save, loading models from runs, trainer state for resume.

A run directory holds config.yaml, tokenizer.json, metrics.jsonl and checkpoints/step_{N:07d}/ with
model.safetensors and trainer.pt. A checkpoint directory is written under a temporary name and renamed into place,
so it is complete or absent.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from .config import ModelConfig, settable_fields
from .errors import SSLensError
from .fileio import atomic_directory, atomic_write_text
from .model import HookedLlama
from .tokenizer import load_tokenizer

_STEP_DIR = re.compile(r"step_(\d{7})")


def checkpoint_steps(schedule: str | list[int], max_steps: int, every: int) -> set[int]:
    """Steps to save. "log": 0 and every power of two up to 1024, then every `every` steps (Pythia-style);
    "linear": every `every` steps from 0; or an explicit list. The last step is always saved."""
    if isinstance(schedule, list) or re.fullmatch(r"[\d,\s]+", str(schedule)):
        steps = {
            int(s) for s in (schedule if isinstance(schedule, list) else str(schedule).split(",")) if str(s).strip()
        }
    elif schedule == "log":
        steps = {0} | {2**k for k in range(11)} | set(range(every, max_steps + 1, every))
    elif schedule == "linear":
        steps = set(range(0, max_steps + 1, every))
    else:
        raise SSLensError(
            f"checkpoint_schedule must be log, linear or a list of steps like 0,100,200; got {schedule!r}"
        )
    return {s for s in steps if s <= max_steps} | {max_steps}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def saved_steps(run_dir: str | Path) -> list[int]:
    """The steps of the run's complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())


def requested_steps(path: str | Path, steps: Sequence[int] | str | None, purpose: str) -> list[int | None]:
    """`steps` checked against what `path` holds: "all" (every saved step of a run), a list of steps, or None (the
    newest checkpoint, or the one model of a checkpoint or HF directory). `purpose` ("probe") names the refusal."""
    if steps is None:
        return [None]
    saved = saved_steps(path)
    if steps == "all":
        if not saved:
            raise SSLensError(
                f"{path} is not a run directory with checkpoints, so --steps all has nothing to {purpose}"
            )
        return list(saved)
    if missing := [s for s in steps if s not in saved]:
        raise SSLensError(f"{path} has no checkpoint at step {missing[0]}; saved steps: {saved or 'none'}")
    return list(steps)


def save_checkpoint(run_dir: Path, step: int, model: HookedLlama, trainer_state: dict) -> Path:
    """Write step `step` atomically: files into a temporary directory, flushed, then one rename."""
    final = checkpoint_dir(run_dir, step)
    # each file is serialised in memory, then written by plain writes: a full disk is then an OSError that
    # `writing` names (the serialisers' own file writers wrap it in errors of their own)
    weights = save_tensors(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, metadata={"step": str(step)}
    )
    with atomic_directory(final, 3 * len(weights)) as tmp:  # the weights, then AdamW's two moments
        _write_synced(tmp / "model.safetensors", weights)
        state = io.BytesIO()
        torch.save(trainer_state, state)
        _write_synced(tmp / "trainer.pt", state.getbuffer())
    return final


def drop_old_trainer_states(run_dir: Path, keep: int) -> None:
    """Delete trainer.pt (AdamW's moments: twice the weights' size) from all but the newest `keep` checkpoints that
    have one. Their weights stay: analyses of training dynamics read those; only --resume needs the rest."""
    for step in resumable_steps(run_dir)[:-keep]:
        (checkpoint_dir(run_dir, step) / "trainer.pt").unlink(missing_ok=True)


def resumable_steps(run_dir: str | Path) -> list[int]:
    """The saved steps whose checkpoint still holds its trainer state, oldest first."""
    return [s for s in saved_steps(run_dir) if (checkpoint_dir(run_dir, s) / "trainer.pt").is_file()]


def write_run_config(run_dir: Path, values: dict) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(values, sort_keys=False))


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_split(run_dir: Path, record: dict) -> None:
    """Which stories the run trains on and which it holds out for validation (`sslens.data.Split.record`)."""
    atomic_write_text(run_dir / "split.json", json.dumps(record, indent=1) + "\n")


def read_split(run_dir: str | Path) -> dict | None:
    """The run's split record, or None for a run made before sslens recorded it."""
    path = Path(run_dir) / "split.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SSLensError(f"{path} is unreadable ({type(e).__name__})") from None


def read_run_config(run_dir: Path) -> dict:
    try:
        values = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: bytes that are not UTF-8
        raise SSLensError(
            f"{run_dir}/config.yaml is unreadable: {(str(e).splitlines() or [type(e).__name__])[0]}"
        ) from None
    if not isinstance(values, dict):
        raise SSLensError(f"{run_dir}/config.yaml is not a mapping of config keys")
    return values


def load_run_model(run_dir: str | Path, step: int | None = None) -> HookedLlama:
    """The model of a run's checkpoint: the newest, or `step`. The run's tokenizer is attached."""
    run_dir = Path(run_dir)
    steps = saved_steps(run_dir)
    if not steps:
        raise SSLensError(f"{run_dir} has no checkpoints yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise SSLensError(
            f"{run_dir} has no checkpoint at step {step}; saved steps: {steps[0]} .. {steps[-1]} ({len(steps)})"
        )
    values = read_run_config(run_dir)
    model = HookedLlama(ModelConfig.from_dict({f.name: values[f.name] for f in settable_fields() if f.name in values}))
    path = checkpoint_dir(run_dir, step) / "model.safetensors"
    try:
        model.load_state_dict(load_file(path))
    except Exception as e:
        raise SSLensError(
            f"{path} is unreadable or from another config ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    if (run_dir / "tokenizer.json").is_file():
        model.tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return model.eval()


def find_models(root: str | Path, depth: int = 3) -> list[str]:
    """Model directories under `root` (at most `depth` levels down), as paths relative to it: sslens runs
    (config.yaml) and HF-format Llama directories (config.json). Runs are not searched inside."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and ("config.yaml" in filenames or "config.json" in filenames):
            found.append(here.relative_to(root).as_posix())
            dirnames.clear()
        elif len(here.relative_to(root).parts) >= depth:
            dirnames.clear()
        dirnames.sort()
    return sorted(found)


def resolve_model(root: str | Path, name: str) -> Path:
    """`root / name`, refusing names that could leave `root` (absolute paths, `..`, links pointing outside) and
    model directories holding a link that leads outside (see check_inside)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise SSLensError(f"{name!r} is not a model name inside the runs root")
    path = (Path(root) / name).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise SSLensError(f"{name!r} points outside the runs root")
    check_inside(root, path)
    return path


def check_inside(root: str | Path, model_dir: Path) -> None:
    """Refuse a model directory under `root` if a file that loading it at any step could open, or its
    metrics.jsonl, leads outside `root` through a link or is a loop of links: SSLensError names the file. Links that
    stay inside are fine.

    The list is every file `load_model` could pick whichever kind of directory this looks like (a run, an HF
    directory), so it cannot disagree with the branch the loader takes. Directories come before what they hold,
    and checkpoints/ is listed only once it is known to stay inside, so nothing outside is read, not even a name."""
    inside = Path(root).resolve()
    files = [
        model_dir / name
        for name in (
            "config.yaml",
            "config.json",
            "tokenizer.json",
            "metrics.jsonl",
            "pytorch_model.bin",
            "checkpoints",
        )
    ]
    refuse_outside(inside, files + sorted(model_dir.glob("*.safetensors")))
    if (model_dir / "checkpoints").is_dir():
        for step_dir in sorted(p for p in (model_dir / "checkpoints").iterdir() if _STEP_DIR.fullmatch(p.name)):
            refuse_outside(inside, [step_dir, step_dir / "model.safetensors"])


def refuse_outside(inside: Path, paths: list[Path]) -> None:
    """Refuse, in one line, any of `paths` that is a loop of links or leads outside `inside` (a resolved root)."""
    for path in paths:
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a loop of links: RuntimeError before Python 3.13, OSError since
            raise SSLensError(f"{path} is a loop of symbolic links; fix or remove the link") from None
        if not target.is_relative_to(inside):
            raise SSLensError(
                f"{path} leads outside the runs root {inside} (to {target}), so it is not opened; "
                "copy the file into the run instead of linking to it"
            )


def read_metrics(path: str | Path) -> tuple[list[dict], list[int]]:
    """The records of a metrics.jsonl, and the numbers (from 1) of its lines that are not a complete JSON record:
    a last line cut short by a full disk or a killed process, or any line damaged later."""
    records, bad = [], []
    path = Path(path)
    if not path.is_file():
        return records, bad
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


def tokens_seen(run_dir: str | Path) -> dict[int, int]:
    """Training tokens seen at each saved step, from metrics.jsonl (every checkpoint step is logged)."""
    seen = {0: 0} | {r["step"]: r.get("tokens", 0) for r in read_metrics(Path(run_dir) / "metrics.jsonl")[0]}
    return {step: seen[step] for step in saved_steps(run_dir) if step in seen}


def load_trainer_state(run_dir: Path, step: int) -> dict:
    path = checkpoint_dir(run_dir, step) / "trainer.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SSLensError(f"{path} is unreadable ({type(e).__name__}); it is refused, not executed") from None
    keys = ("step", "optimizer", "data_position", "torch_rng")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise SSLensError(f"{path} is not an sslens trainer state (missing {missing[0]!r}); it is refused")
    return state


def load_model(path: str | Path, step: int | None = None) -> HookedLlama:
    """A HookedLlama from a run directory (newest checkpoint, or `step`), a checkpoint directory, a local
    HF-format Llama directory, or an HF hub name when online (e.g. "SimpleStories/SimpleStories-5M")."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return load_run_model(path, step)
    if (m := _STEP_DIR.fullmatch(path.name)) and (path.parent.parent / "config.yaml").is_file():
        return load_run_model(path.parent.parent, int(m.group(1)))
    if step is not None:
        raise SSLensError(f"{path} is not a run directory, so it has no steps to choose from")
    return load_hf(path)


def load_hf(name_or_path: str | Path) -> HookedLlama:
    """A HookedLlama from a local HF-format Llama directory or a hub name (see `hf.hf_location`)."""
    from .hf import hf_location, read_hf_config, read_hf_weights  # transformers: imported only when needed

    path, name = hf_location(name_or_path)
    model = HookedLlama(read_hf_config(path, name))  # refuses a model too large for memory before reading weights
    try:
        model.load_state_dict(read_hf_weights(path, model.cfg.n_layers))
    except RuntimeError as e:  # a weight's shape differs from what config.json says
        raise SSLensError(f"{path}: weights do not match its config.json ({str(e).splitlines()[0]})") from None
    if (path / "tokenizer.json").is_file():
        model.tokenizer = load_tokenizer(path / "tokenizer.json")
    return model
