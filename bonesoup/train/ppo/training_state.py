"""Training checkpoints: everything a PPO run needs to continue after a kill, written atomically.

A checkpoint is a directory ``<root>/step-NNNNNNNN`` (the number of steps
done) holding

- ``model.safetensors``: the trainable parameters (the whole policy and value
  head, or, under LoRA, the adapters and the value head: the frozen base is
  the run's input and is not copied);
- ``optimizer.safetensors``: the optimiser's per-parameter state tensors;
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``state.json``: the step, the KL controller, the optimiser's non-tensor
  state, python's and numpy's generator states, the training log so far, and
  the run's settings and inputs (a resume refuses a checkpoint of another run).

It is written with :func:`bonesoup.merge.atomic_dir.atomic_output_dir`
(temporary directory, fsync, ``os.replace``), so a ``step-*`` directory is
always complete; the previous checkpoint is removed only after the new one is
in place. Tensors go through safetensors, never pickles.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT", "checkpoint_path", "complete_checkpoints", "latest_checkpoint", "write_checkpoint",
           "read_checkpoint", "rng_state", "set_rng_state", "optimizer_state", "load_optimizer_state",
           "check_same_run", "trainable_parameters", "run_description", "save_trainer", "restore_trainer"]

#: Version of the layout above; a checkpoint of another version is refused.
FORMAT = 1
_NAME = re.compile(r"step-(\d{8})")
_FILES = ("model", "optimizer", "rng")


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``root / f"step-{step:08d}"``: the checkpoint after ``step`` steps."""
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (temporary directories of a write are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def write_checkpoint(root: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                     keep: int = 1) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, then keep only the newest ``keep`` ones.

    Parameters
    ----------
    tensors : {"model" | "optimizer" | "rng": {key: tensor}}
        Each dict becomes ``<name>.safetensors`` (tensors are copied to the CPU, made contiguous).
    state : dict
        JSON-able; becomes ``state.json`` (floats round-trip exactly).
    """
    from safetensors.torch import save_file

    from bonesoup.merge.atomic_dir import atomic_output_dir

    if set(tensors) - set(_FILES):
        raise ValueError(f"tensors: unknown files {sorted(set(tensors) - set(_FILES))}; known: {list(_FILES)}")
    from bonesoup.merge.atomic_dir import clean_stale_temp_dirs

    target = checkpoint_path(root, step)
    if Path(root).is_dir():  # leftovers of a write that was killed, whichever step it was writing
        for entry in Path(root).iterdir():
            m = re.match(r"\.(step-\d{8})\.bonesoup-", entry.name)
            if m:
                clean_stale_temp_dirs(Path(root) / m.group(1))
    # force: a checkpoint of this step may exist from before a resume (same content: the run is deterministic).
    with atomic_output_dir(target, force=True) as tmp:
        for name, d in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in d.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state}))
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``(tensors, state)`` of a checkpoint written by :func:`write_checkpoint`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a training checkpoint ({e})") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}/state.json: format {state.get('format')!r}, this code reads format {FORMAT}")
    tensors = {name: load_file(str(path / f"{name}.safetensors")) for name in _FILES
               if (path / f"{name}.safetensors").is_file()}
    return tensors, state


# ----------------------------------------------------------------------------- generators


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global generator a step could draw from: torch CPU / CUDA (tensors), python and numpy (JSON).

    The PPO step itself draws only from generators seeded by (seed, step)
    and from Philox keys; these are saved so that a reward function or model
    code that uses the global generators also continues where it stopped.
    """
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only for the devices present)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- optimiser


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's ``state_dict`` split into tensors (``"<param index>/<name>"``) and JSON (the rest)."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{k}"] = v
            else:
                other.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "other": other}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Load what :func:`optimizer_state` returned (torch checks that the groups and sizes fit)."""
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split("/", 1)
        per_param.setdefault(int(idx), {})[name] = v
    for idx, st in state["other"].items():
        per_param.setdefault(int(idx), {}).update(st)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


# ----------------------------------------------------------------------------- same run?


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_same_run(saved: dict, current: dict, where: str | Path) -> None:
    """Refuse (ValueError naming the fields) when a checkpoint's settings or inputs differ from this run's.

    ``saved`` and ``current`` are nested JSON-able dicts; they are compared
    field by field after a JSON round trip (tuples and lists compare equal).
    """
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a.get(k, '<absent>')!r}, this run {b.get(k, '<absent>')!r}"
                          for k in diff[:5])
        more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
        raise ValueError(f"cannot resume from {where}: it was written by a run with other settings or inputs: "
                         f"{shown}{more}. Resume with the same settings, or start afresh without resume.")


# ----------------------------------------------------------------------------- a trainer's state


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the parameters that train (tied ones once): what a checkpoint holds."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def _json(x):
    return json.loads(json.dumps(x, default=str))


def run_description(trainer, metadata: dict | None = None) -> dict:
    """What a checkpoint must share with the run that resumes it: settings, prompts, reward, model shape, metadata.

    ``metadata`` is the caller's description of the inputs (``train_checkpoint``
    passes the SFT checkpoint's path and fingerprint, the rewards, weights and
    normalisation, the LoRA rank).
    """
    from bonesoup.fingerprint import fingerprint

    r = trainer.reward_fn
    norm = getattr(r, "normalization", None)
    reward = {"type": type(r).__name__, "names": getattr(r, "names", None),
              "weights": [float(w) for w in getattr(r, "weights", [])],
              "normalization": norm.to_dict() if norm is not None else None}
    params = trainable_parameters(trainer.module)
    shapes = [[k, list(p.shape), str(p.dtype)] for k, p in params.items()]
    return _json({"config": trainer.config.run_settings(), "prompts": fingerprint(trainer.prompts),
                  "objectives": trainer.objective_names, "reward": reward,
                  "trainable": {"tensors": len(shapes), "elements": sum(p.numel() for p in params.values()),
                                "names_shapes_dtypes": fingerprint(shapes)},
                  "metadata": metadata or {}})


def save_trainer(trainer, root: str | Path, records: list[dict], description: dict) -> Path:
    """Write ``trainer``'s state after ``trainer.step_index`` steps (and the log ``records``) under ``root``."""
    from dataclasses import asdict

    opt_t, opt_s = optimizer_state(trainer.optimizer)
    rng_t, rng_s = rng_state()
    state = {"step": trainer.step_index, "kl_controller": asdict(trainer.kl_ctl), "optimizer": opt_s,
             "rng": rng_s, "log": records, "run": description, "world_size": trainer.dist.world}
    return write_checkpoint(root, trainer.step_index,
                            {"model": trainable_parameters(trainer.module), "optimizer": opt_t, "rng": rng_t}, state)


@torch.no_grad()
def restore_trainer(trainer, path: str | Path, description: dict) -> list[dict]:
    """Load checkpoint ``path`` into ``trainer`` (in place) after checking it is this run's; returns its log."""
    tensors, state = read_checkpoint(path)
    check_same_run(state.get("run", {}), description, path)
    params = trainable_parameters(trainer.module)
    saved = tensors.get("model", {})
    if set(saved) != set(params):
        raise ValueError(f"{path}/model.safetensors: keys differ from the trainable parameters: missing "
                         f"{sorted(set(params) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(params))[:5]}")
    for k, p in params.items():
        if saved[k].shape != p.shape or saved[k].dtype != p.dtype:
            raise ValueError(f"{path}/model.safetensors: {k} is {tuple(saved[k].shape)} {saved[k].dtype}, "
                             f"the parameter {tuple(p.shape)} {p.dtype}")
        p.copy_(saved[k])
    load_optimizer_state(trainer.optimizer, tensors.get("optimizer", {}), state["optimizer"])
    for k, v in state["kl_controller"].items():
        setattr(trainer.kl_ctl, k, v)
    trainer.step_index = int(state["step"])
    set_rng_state(tensors["rng"], state["rng"])
    return list(state["log"])
