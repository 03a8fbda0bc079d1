"""mergekit YAML configs for the merges that are one weighted sum: ``bonesoup merge --config merge.yaml``.

People who merge checkpoints today write mergekit configs; the ones whose
method is a single weighted sum ``out = sum_k c_k x_k`` run here unchanged
(our fused one-pass merge), everything else is refused, naming what, before
any checkpoint is read.

Accepted (as mergekit reads them; ``parameters`` may sit on a model or at the
top level, the model's value winning):

- ``merge_method: linear``: ``models[].parameters.weight`` w_i (required),
  ``normalize`` (default true): ``out = sum_i w_i x_i / (sum_i w_i if normalize else 1)``.
- ``merge_method: task_arithmetic``: ``base_model`` b, ``weight`` w_i,
  ``lambda`` (default 1), ``normalize`` (default false):
  ``out = b + lambda * sum_i w_i (x_i - b) / (sum_i w_i if normalize else 1)``;
  a model equal to ``base_model`` adds a zero task vector and is skipped.
- ``merge_method: bone_soup`` (ours, same schema): ``models[]`` are the
  backbones with ``parameters.preference`` mu_i; ``beta`` (required),
  ``alpha`` (default 0); ``base_model`` (or ``sft``) the SFT model, needed
  when alpha != 0 (lambda = B^-1 mu, then ``(1 + alpha) lambda`` and ``-alpha``).
- ``dtype``: mergekit's compute dtype. Ours always accumulates in float32 and
  rounds once, so it only sets the output dtype when ``out_dtype`` is absent.
  ``out_dtype``: the output dtype. Neither: each tensor keeps its input dtype.
- ``tokenizer_source``: absent or ``base``: the base model's tokenizer files
  (the first model's without a base); a model path: that model's. ``union``
  is refused (it builds a new vocabulary, which is not a weighted sum).
- Model paths are local checkpoint directories, relative to the working
  directory (as mergekit resolves them). A model may be a LoRA adapter:
  ``model: BASE+ADAPTER`` (mergekit's spelling of a base with a LoRA) or a
  plain peft adapter directory (its base: the config's ``base_model`` / ``sft``,
  else the base the adapter records). It enters the sum as ``BASE + D``: its
  coefficient goes to ``BASE`` (added to the same model's where it is listed
  too) and to the adapter's delta ``D`` (:mod:`bonesoup.merge.adapter_merge`).

Refused with a message that names it: any other ``merge_method`` (ties,
dare_*, slerp, ... are not one weighted sum), ``slices`` / layer ranges,
per-tensor parameter filters or gradients (lists), a ``base_model`` or
``tokenizer_source`` with a LoRA, and unknown keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .coefficients import merge_coefficients

__all__ = ["SUPPORTED_METHODS", "MergekitPlan", "load_mergekit_config", "plan_from_config"]

#: merge_method values that are one weighted sum of the inputs.
SUPPORTED_METHODS = ("linear", "task_arithmetic", "bone_soup")
# mergekit methods that are not one weighted sum: named in the refusal so the user knows why.
_NONLINEAR = {
    "ties": "trims and sign-elects task vectors per element",
    "dare_ties": "drops and rescales task-vector elements at random, then elects signs",
    "dare_linear": "drops and rescales task-vector elements at random",
    "breadcrumbs": "drops the largest and smallest task-vector elements",
    "breadcrumbs_ties": "drops task-vector elements and elects signs",
    "della": "drops task-vector elements by magnitude rank", "della_linear": "drops task-vector elements by rank",
    "slerp": "interpolates on the sphere (depends on the angle between the inputs)",
    "nuslerp": "interpolates on the sphere", "multislerp": "interpolates on the sphere",
    "karcher": "takes a Riemannian mean", "model_stock": "weights by the angle between task vectors",
    "sce": "selects, calculates and erases elements by variance", "nearswap": "swaps elements by distance",
    "arcee_fusion": "fuses by dynamic thresholds", "passthrough": "stacks layers (a different architecture)",
    "ram": "reweights by the agents' overlap", "ramplus_tl": "reweights by the agents' overlap",
}
_TOP_KEYS = {"merge_method", "models", "base_model", "sft", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_PARAMS = {"linear": {"weight", "normalize"}, "task_arithmetic": {"weight", "normalize", "lambda"},
           "bone_soup": {"preference", "beta", "alpha"}}


@dataclass
class MergekitPlan:
    """A config turned into one weighted sum.

    Attributes
    ----------
    inputs : list of (Path, float, str)
        Checkpoint directory, coefficient (float64), role (``"model"``, ``"base"``,
        ``"backbone"``, ``"sft"``), in order; the layout input first.
    out_dtype : str or None
        Output dtype name, None to keep each tensor's.
    tokenizer_dir : Path or None
        Where the tokenizer files come from, None for the layout input.
    report : dict
        What goes into ``bonesoup-merge.json`` (method, config path, parameters).
    adapters : list of (Path, float, Path)
        LoRA adapter directory, coefficient of its delta, and the checkpoint it applies to
        (that checkpoint's share of the coefficient is in ``inputs``).
    """

    inputs: list[tuple[Path, float, str]]
    out_dtype: str | None
    tokenizer_dir: Path | None
    report: dict
    adapters: list[tuple[Path, float, Path]] = field(default_factory=list)


class _Ref(NamedTuple):
    """A model entry: a checkpoint directory, plus the LoRA adapter applied to it (None: the checkpoint alone)."""

    path: Path
    adapter: Path | None = None


def load_mergekit_config(path: str | os.PathLike) -> dict:
    """Read a mergekit YAML file (safe loader) into a dict; ValueError naming the file otherwise."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read the merge config {path}: {exc.strerror}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a YAML mapping (merge_method, models, ...), got {type(config).__name__}")
    return config


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a list (per-layer gradient or per-tensor filter)" if isinstance(value, list) else repr(value)
        raise ValueError(f"{what} must be one number; got {kind:.120}. Per-tensor filters and gradients are not "
                         "supported: bonesoup merges every tensor with the same coefficients")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _model_path(entry, where: str) -> Path:
    """A plain checkpoint directory (base_model, tokenizer_source): no adapter allowed there."""
    ref = _model_ref(entry, where, None, adapters=False)
    return ref.path


def _model_ref(entry, where: str, base: Path | None, *, adapters: bool = True) -> _Ref:
    """A model entry: ``DIR``, ``BASE+ADAPTER`` (mergekit's model+LoRA) or a plain adapter directory on ``base``."""
    from .adapter_merge import ADAPTER_CONFIG, is_adapter_dir

    if not isinstance(entry, str) or not entry:
        raise ValueError(f"{where} must be a checkpoint directory (a string), got {entry!r:.80}")
    if "+" in entry and not Path(entry).exists():
        if not adapters:
            raise ValueError(f"{where} {entry!r} names a model+LoRA pair, which is supported in 'models' only")
        model, lora = entry.split("+", 1)
        if not is_adapter_dir(lora):
            raise ValueError(f"{where} {entry!r} names a model+LoRA pair but {lora!r} holds no {ADAPTER_CONFIG} "
                             "(a peft LoRA adapter directory)")
        return _Ref(Path(model), Path(lora))
    if not is_adapter_dir(entry):
        return _Ref(Path(entry))
    if not adapters:
        raise ValueError(f"{where} {entry!r} is a LoRA adapter; it must be a checkpoint directory")
    if base is None:  # the base the adapter records
        cfg_file = Path(entry) / ADAPTER_CONFIG
        try:
            recorded = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: cannot read {cfg_file}: {exc}") from None
        if not isinstance(recorded, str) or not Path(recorded).is_dir():
            raise ValueError(f"{where} {entry!r} is a LoRA adapter whose base ({recorded!r}, from {cfg_file}) is not "
                             "a local directory; name it as base_model or write the model as BASE+ADAPTER")
        base = Path(recorded)
    return _Ref(base, Path(entry))


def _parameters(value, where: str, method: str, allowed: set) -> dict:
    """A ``parameters`` mapping (None: empty) whose keys all apply to ``method``; the error names ``where``."""
    params = value or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be a mapping, got {params!r:.80}")
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(f"{where}: {bad} do not apply to merge_method {method!r} (it takes {sorted(allowed)})")
    return params


def plan_from_config(config: dict, source: str = "config") -> MergekitPlan:
    """Validate a mergekit config (dict) and turn it into coefficients; reads no checkpoint.

    Raises
    ------
    ValueError
        Naming the key, model or method that is wrong or unsupported, and ``source``.
    """
    unknown = sorted(set(config) - _TOP_KEYS)
    if "slices" in config:
        raise ValueError(f"{source}: 'slices' (layer ranges, frankenmerges) are not supported: bonesoup merges "
                         "whole checkpoints with one weighted sum; list the models under 'models'")
    if unknown:
        raise ValueError(f"{source}: unsupported key(s) {unknown}; bonesoup reads {sorted(_TOP_KEYS)}")
    method = config.get("merge_method")
    if method not in SUPPORTED_METHODS:
        why = _NONLINEAR.get(method)
        reason = (f"it {why}, which is not one weighted sum of the inputs" if why
                  else "it is not a method bonesoup knows")
        raise ValueError(f"{source}: merge_method {method!r} is not supported: {reason}. Supported: "
                         f"{', '.join(SUPPORTED_METHODS)}")
    allowed = _PARAMS[method]
    top = _parameters(config.get("parameters"), f"{source}: parameters", method, allowed)
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{source}: 'models' must be a non-empty list of {{model: DIR, parameters: {{...}}}}")
    base = config.get("base_model")
    if method == "bone_soup" and config.get("sft") is not None:
        if base is not None:
            raise ValueError(f"{source}: give the SFT model once, as base_model or sft, not both")
        base = config["sft"]
    elif config.get("sft") is not None:
        raise ValueError(f"{source}: 'sft' is a bone_soup key; merge_method {method!r} names its base as base_model")
    base_path = _model_path(base, f"{source}: base_model") if base is not None else None
    entries: list[tuple[_Ref, dict]] = []
    for i, m in enumerate(models):
        where = f"{source}: models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
            raise ValueError(f"{where} must be a mapping with 'model' (and optional 'parameters'), got {m!r:.120}")
        params = _parameters(m.get("parameters"), f"{where}.parameters", method, allowed)
        entries.append((_model_ref(m["model"], f"{where}.model", base_path), {**top, **params}))

    def param(params: dict, name: str, where: str, default=None):
        if name not in params:
            if default is None:
                raise ValueError(f"{where}: parameter {name!r} is required for merge_method {method!r}")
            return default
        return _number(params[name], f"{where}: parameter {name!r}")

    def flag(params: dict, name: str, default: bool) -> bool:
        value = params.get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"{source}: parameter {name!r} must be true or false, got {value!r:.40}")
        return value

    inputs: list[tuple[_Ref, float, str]]
    report: dict = {"method": f"mergekit:{method}", "config": source}
    if method == "linear":
        weights = [param(p, "weight", f"{source}: models[{i}]") for i, (_, p) in enumerate(entries)]
        normalize = flag(top, "normalize", True) and all(flag(p, "normalize", True) for _, p in entries)
        total = sum(weights)
        if normalize and total == 0.0:
            raise ValueError(f"{source}: normalize is true but the weights {weights} sum to 0")
        scale = 1.0 / total if normalize else 1.0
        inputs = [(ref, w * scale, "model") for (ref, _), w in zip(entries, weights)]
        if base_path is not None and not any(_same(base_path, ref.path) for ref, _ in entries):
            inputs.insert(0, (_Ref(base_path), 0.0, "base"))  # layout, config and tokenizer only
        elif base_path is not None:
            k = next(k for k, (ref, _, _) in enumerate(inputs) if _same(base_path, ref.path))
            inputs.insert(0, inputs.pop(k))
        report.update(weights=weights, normalize=normalize)
    elif method == "task_arithmetic":
        if base_path is None:
            raise ValueError(f"{source}: merge_method 'task_arithmetic' needs base_model (the task vectors are "
                             "x_i - base_model)")
        lam = param(top, "lambda", source, default=1.0)
        # A model equal to the base adds a zero task vector; the base with a LoRA adds the LoRA's delta.
        tasks = [(i, ref, p) for i, (ref, p) in enumerate(entries) if ref.adapter or not _same(base_path, ref.path)]
        weights = [param(p, "weight", f"{source}: models[{i}]") for i, _, p in tasks]
        normalize = flag(top, "normalize", False) and all(flag(p, "normalize", False) for _, _, p in tasks)
        total = math.fsum(weights)
        # mergekit divides by the weight sum unless it is below 1e-8 in magnitude (then by 1)
        scale = lam / total if normalize and abs(total) >= 1e-8 else lam
        coeffs = [w * scale for w in weights]
        inputs = [(_Ref(base_path), 1.0 - math.fsum(coeffs), "base")]
        inputs += [(ref, c, "model") for (_, ref, _), c in zip(tasks, coeffs)]
        report.update(weights=weights, normalize=normalize, **{"lambda": lam})
    else:  # bone_soup: our method in mergekit's schema
        pref = [param(p, "preference", f"{source}: models[{i}]") for i, (_, p) in enumerate(entries)]
        beta = param(top, "beta", source)
        alpha = param(top, "alpha", source, default=0.0)
        c, c_sft = merge_coefficients(pref, method="bone", beta=beta, alpha=alpha)
        if c_sft != 0.0 and base_path is None:
            raise ValueError(f"{source}: alpha={alpha} extrapolates away from the SFT model, so base_model (or sft) "
                             "must name it")
        inputs = [(ref, float(k), "backbone") for (ref, _), k in zip(entries, c)]
        if base_path is not None:
            inputs.append((_Ref(base_path), float(c_sft), "sft"))
        report.update(preference=pref, beta=beta, alpha=alpha)

    out_dtype = config.get("out_dtype") or config.get("dtype")
    from soupkernels._dtypes import parse_dtype_name

    out_name = parse_dtype_name(out_dtype, f"{source}: {'out_dtype' if config.get('out_dtype') else 'dtype'}")
    tok = config.get("tokenizer_source")
    tokenizer_dir = None
    if tok == "union":
        raise ValueError(f"{source}: tokenizer_source 'union' builds a new vocabulary (new embedding rows), which is "
                         "not a weighted sum of the inputs; use 'base' or a model path")
    if tok not in (None, "base"):
        tokenizer_dir = _model_path(tok, f"{source}: tokenizer_source")
    report.update(dtype_config=config.get("dtype"), out_dtype=out_name, tokenizer_source=tok)
    full, adapters = _split_adapters(inputs)
    return MergekitPlan(full, out_name, tokenizer_dir, report, adapters)


def _split_adapters(inputs: list[tuple[_Ref, float, str]]) -> tuple[list[tuple[Path, float, str]], list]:
    """``c (BASE + D)`` -> ``c BASE`` and ``c D``; terms of one checkpoint summed (each file read once), order kept."""
    full: list[tuple[Path, float, str]] = []
    adapters = []
    for ref, c, role in inputs:
        if ref.adapter is not None:
            adapters.append((ref.adapter, c, ref.path))
            role = "adapter base"
        k = next((k for k, (p, _, _) in enumerate(full) if _same(p, ref.path)), None)
        if k is None:
            full.append((ref.path, c, role))
        else:
            full[k] = (full[k][0], full[k][1] + c, full[k][2])
    return full, adapters


def _same(a: Path, b: Path) -> bool:
    """Whether two model paths name the same directory (resolved), as mergekit compares model references."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return str(a) == str(b)
