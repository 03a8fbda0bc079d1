"""``bonesoup extract-lora``: a full fine-tune as a LoRA adapter on its SFT model (truncated SVD per layer).

A full-FT backbone cannot join an :class:`~bonesoup.merge.adapter_soup.AdapterSoup`
(per-row preferences, no re-merge) as it is; its delta from the SFT model can,
approximately. For each linear layer (``nn.Linear``, transformers' ``Conv1D``;
decided from the model's modules, built from its config on the meta device)

    D = W_backbone - W_sft   [out, in] (Conv1D's [in, out] transposed),   D ~ D_r = U_r S_r V_r^T   (best rank r),
    B = U_r sqrt(S_r)   [out, r],   A = sqrt(S_r) V_r^T   [r, in],   scaling 1 (lora_alpha = r),

written as a peft adapter (:meth:`~bonesoup.merge.lora.LoraAdapter.save`), base
= the SFT directory. The error ``||D - D_r||_F / ||D||_F`` is reported per layer
and overall, measured on the factors as saved (their rounding included).

SVD: ``torch.linalg.svd`` in float64 by default. The delta of two float32 (or
bf16) weights is exact in float64, and a full SVD gives the optimal truncation
(Eckart-Young), so the reported error is the least any rank-r adapter can
have; float64 costs about 2x float32 on the CPU, which is small next to
reading the checkpoints, and keeps the reported error meaningful down to
1e-12 (an exactly low-rank delta comes back exactly). ``svd="lowrank"``
(``torch.svd_lowrank``, randomized, float32, 4 power iterations) is for large
layers where a full SVD is too slow; its error is measured the same way.

Parameters that are not linear-layer weights (norms, embeddings, biases, a
tied ``lm_head``, which is the embedding) cannot be carried by a LoRA: the
adapter leaves them at the SFT's values. If any differs from the SFT beyond
``dense_tolerance`` (relative Frobenius change), extraction is refused, naming
the worst ones, unless ``allow_dense_drift`` (then their relative change is in
the report, and the extracted backbone is the SFT model there).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import CheckpointDir, validate_compatible
from .cpu_merge import check_output_dir
from .lora import LoraAdapter, LoraModule

__all__ = ["EXTRACT_REPORT_NAME", "LinearLayer", "Extraction", "linear_layers", "extract_lora", "format_report"]

#: The extraction report written beside the adapter.
EXTRACT_REPORT_NAME = "bonesoup-extract.json"
_SVD_METHODS = ("full", "lowrank")
_FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of the model: ``module`` (its name), ``fan_in_fan_out`` (Conv1D: weight stored [in, out])."""

    module: str
    kind: str
    fan_in_fan_out: bool

    @property
    def key(self) -> str:
        return f"{self.module}.weight"


@dataclass
class Extraction:
    """What :func:`extract_lora` returns: the adapter (in memory; saved when ``out_dir`` was given) and the report."""

    adapter: LoraAdapter
    report: dict


def _skeleton(config: dict):
    """The model of ``config`` (a config.json) on the meta device (no memory, no weights): its module tree."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        return cls(cfg) if cls is not None else transformers.AutoModelForCausalLM.from_config(cfg)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """peft's rule for a ``target_modules`` list: the name itself or a dotted suffix of it."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def linear_layers(config: dict, *, exclude: Sequence[str] = ()) -> tuple[dict[str, LinearLayer], dict[str, str],
                                                                          list[str]]:
    """The linear layers of the model ``config`` describes, and what every other parameter is.

    Parameters
    ----------
    config : dict
        A checkpoint's ``config.json``.
    exclude : sequence of str
        Module names (or dotted suffixes, as peft matches ``target_modules``) not to extract.

    Returns
    -------
    layers : dict of weight key -> LinearLayer
        ``nn.Linear`` and ``Conv1D`` modules, excluding a ``lm_head`` tied to the input embedding
        (its weight IS the embedding: a LoRA on the head would not change the input side).
    kinds : dict of parameter key -> str
        Every other parameter's kind for the report (``"Embedding.weight"``, ``"LayerNorm.bias"``, ...).
    modules : list of str
        Every module name (to check that a ``target_modules`` list selects exactly ``layers``).
    """
    from transformers.pytorch_utils import Conv1D

    model = _skeleton(config)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied_out = out_emb if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight else None
    layers, kinds, names, hit = {}, {}, [], set()
    for name, module in model.named_modules():
        names.append(name)
        is_linear = isinstance(module, (torch.nn.Linear, Conv1D)) and module is not tied_out
        if is_linear:
            hit.update(e for e in exclude if _matches(name, [e]))
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if is_linear and pname == "weight" and not _matches(name, exclude):
                layers[key] = LinearLayer(name, type(module).__name__, isinstance(module, Conv1D))
            else:
                kinds[key] = f"{type(module).__name__}.{pname}" + (" (tied lm_head)" if module is tied_out else "")
    unknown = [e for e in exclude if e not in hit]
    if unknown:
        raise ValueError(f"exclude_modules {unknown} match no linear module of the model (a typo?); its linear "
                         f"modules end in {sorted({layer.module.rsplit('.', 1)[-1] for layer in layers.values()})}")
    return layers, kinds, names


def _target_modules(layers: dict[str, LinearLayer], modules: list[str]) -> list[str]:
    """peft's ``target_modules``: the layers' last names when they select exactly these layers, else full names."""
    suffixes = sorted({layer.module.rsplit(".", 1)[-1] for layer in layers.values()})
    chosen = {layer.module for layer in layers.values()}
    matched = {n for n in modules if n and _matches(n, suffixes)}
    return suffixes if matched == chosen else sorted(chosen)


def _rel(num: float, den: float) -> float:
    return 0.0 if num == 0.0 else (num / den if den > 0.0 else math.inf)


def _change(x: torch.Tensor, y: torch.Tensor, chunk: int = 1 << 22) -> tuple[float, float, float]:
    """``(||x - y||_F, ||y||_F, max |x - y|)`` in float64, in chunks (an embedding in float64 would not fit)."""
    xf, yf = x.reshape(-1), y.reshape(-1)
    d2 = y2 = top = 0.0
    for i in range(0, xf.numel(), chunk):
        a, b = xf[i:i + chunk].double(), yf[i:i + chunk].double()
        d = a - b
        d2 += float(d.square().sum())
        y2 += float(b.square().sum())
        top = max(top, float(d.abs().max()))
    return math.sqrt(d2), math.sqrt(y2), top


def _svd_factors(D: torch.Tensor, rank: int, svd: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, r], A [r, in] in ``dtype`` with B @ A the rank-r truncation of D [out, in] float64 (sqrt(S) split)."""
    if svd == "full":
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        q = min(rank + 8, min(D.shape))  # oversampling: the randomized range finder's usual margin
        with torch.random.fork_rng(devices=[]):  # seeded (the same backbone gives the same adapter), caller's RNG kept
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(D.float(), q=q, niter=4)
        U, S, Vh = U[:, :rank].double(), S[:rank].double(), V[:, :rank].T.double()
    root = S.clamp_min(0.0).sqrt()
    # Splitting sqrt(S) between the factors keeps A and B on one scale, so neither underflows in bf16.
    return (U * root).to(dtype).contiguous(), (root[:, None] * Vh).to(dtype).contiguous()


def extract_lora(backbone: str | os.PathLike, sft: str | os.PathLike, rank: int,
                 out_dir: str | os.PathLike | None = None, *, svd: str = "full", dtype: str = "float32",
                 allow_dense_drift: bool = False, dense_tolerance: float = 1e-6, exclude_modules: Sequence[str] = (),
                 force: bool = False, progress: bool = True) -> Extraction:
    """Extract a rank-``rank`` LoRA adapter from a full fine-tune ``backbone`` of ``sft``.

    Parameters
    ----------
    backbone, sft : path
        Checkpoint directories of one architecture (same keys, shapes, dtypes; checked).
    rank : int >= 1
        LoRA rank; a layer whose smaller side is below it gets that side's rank (exact).
    out_dir : path, optional
        Where to write the peft adapter (atomic; ``force`` replaces) with ``bonesoup-extract.json``.
        None: nothing is written.
    svd : {"full", "lowrank"}
        ``torch.linalg.svd`` in float64 (optimal truncation) or ``torch.svd_lowrank`` (randomized, float32).
    dtype : {"float32", "bfloat16", "float16"}
        dtype of the saved A and B (the SVD runs in float64 either way).
    allow_dense_drift : bool
        Extract although parameters that are not linear layers differ from the SFT (their change is reported).
    dense_tolerance : float
        Largest relative change ``||p - p_sft||_F / ||p_sft||_F`` of such a parameter counted as no drift.
    exclude_modules : sequence of str
        Linear modules (names or dotted suffixes) to leave out; their weights count as dense parameters.

    Returns
    -------
    Extraction
        ``adapter`` (rank ``rank``, scaling 1, fp32 factors by default) and ``report``: per layer
        ``module``, ``shape`` [out, in], ``rank``, ``delta_norm``, ``rel_error``; ``overall_rel_error``
        over the linear layers; ``overall_rel_error_all`` over every parameter (dense drift included);
        ``dense``: every other parameter's ``kind``, ``rel_change``, ``max_abs_change``.

    Raises
    ------
    ValueError
        Bad rank / svd / dtype / tolerance; checkpoints that disagree (naming key and files); dense drift
        beyond the tolerance without ``allow_dense_drift`` (naming the parameters).
    FileExistsError
        ``out_dir`` exists and ``force`` is False (checked before any SVD).
    """
    started = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if svd not in _SVD_METHODS:
        raise ValueError(f"svd must be one of {list(_SVD_METHODS)}, got {svd!r}")
    if dtype not in _FACTOR_DTYPES:
        raise ValueError(f"dtype must be one of {list(_FACTOR_DTYPES)}, got {dtype!r}")
    if isinstance(dense_tolerance, bool) or not isinstance(dense_tolerance, (int, float)) \
            or not dense_tolerance >= 0 or not math.isfinite(dense_tolerance):
        raise ValueError(f"dense_tolerance must be a finite number >= 0, got {dense_tolerance!r}")
    if isinstance(exclude_modules, str):
        exclude_modules = [exclude_modules]
    if out_dir is not None:
        check_output_dir(out_dir, [backbone, sft], force)
    bb, base = CheckpointDir(backbone), CheckpointDir(sft)
    validate_compatible([bb, base])
    layers, kinds, module_names = linear_layers(base.config, exclude=exclude_modules)
    missing = [k for k in layers if k not in base.tensors]
    if missing:
        raise ValueError(f"the model of {base.path / 'config.json'} has the linear layer {missing[0]!r} but "
                         f"{base.path} holds no such key ({len(missing)} such layers); is the config the model's?")
    fans = {layer.fan_in_fan_out for layer in layers.values()}
    if len(fans) > 1:
        conv = sorted(layer.module for layer in layers.values() if layer.fan_in_fan_out)[:2]
        lin = sorted(layer.module for layer in layers.values() if not layer.fan_in_fan_out)[:2]
        raise ValueError(f"the model mixes Conv1D layers ({conv}, ...) and nn.Linear layers ({lin}, ...); one peft "
                         "adapter has one fan_in_fan_out: leave one kind out with exclude_modules (--exclude-modules)")
    if not layers:
        raise ValueError(f"the model of {base.path} has no linear layers to extract (all excluded?)")
    fan_in_fan_out = fans.pop()
    factor_dtype = _FACTOR_DTYPES[dtype]

    with ExitStack() as stack:
        handles: dict = {}

        def read(ck: CheckpointDir, key: str) -> torch.Tensor:
            file = ck.tensors[key].file
            if (id(ck), file) not in handles:
                handles[(id(ck), file)] = stack.enter_context(ck.open_file(file))
            return handles[(id(ck), file)].get_tensor(key)

        # 1. Parameters a LoRA cannot carry: measured first, so a refusal comes before any SVD.
        dense = []
        for key in base.tensors:
            if key in layers:
                continue
            x, y = read(bb, key), read(base, key)
            if x.is_floating_point():
                change, ref, max_abs = _change(x, y)
            else:  # integer / bool buffers: equal or not
                change = ref = max_abs = 0.0 if torch.equal(x, y) else 1.0
            dense.append({"key": key, "kind": kinds.get(key, "buffer (not a parameter)"),
                          "rel_change": _rel(change, ref), "max_abs_change": max_abs, "change_norm": change})
        drifted = sorted((d for d in dense if d["rel_change"] > dense_tolerance), key=lambda d: -d["rel_change"])
        if drifted and not allow_dense_drift:
            worst = "; ".join(f"{d['key']} ({d['kind']}) {d['rel_change']:.3g}" for d in drifted[:3])
            raise ValueError(f"{bb.path}: {len(drifted)} parameter(s) that are not linear-layer weights differ from "
                             f"the SFT model {base.path} by more than the relative tolerance {dense_tolerance:g} "
                             f"(largest: {worst}); a LoRA adapter cannot carry them. Pass allow_dense_drift "
                             "(--allow-dense-drift) to extract anyway: they stay at the SFT's values and their "
                             "change is reported")

        # 2. One truncated SVD per linear layer, streamed (one layer's delta in memory at a time).
        from tqdm.auto import tqdm

        modules, rows = {}, []
        err2 = norm2 = 0.0
        for key, layer in tqdm(list(layers.items()), desc=f"extracting rank-{rank} LoRA", unit="layer",
                               disable=not progress):
            D = read(bb, key).double() - read(base, key).double()
            if layer.fan_in_fan_out:
                D = D.T  # Conv1D stores [in, out]; LoRA's B @ A is [out, in]
            r = min(rank, *D.shape)
            B, A = _svd_factors(D, r, svd, factor_dtype)
            err = float(torch.linalg.matrix_norm(D - B.double() @ A.double()))
            norm = float(torch.linalg.matrix_norm(D))
            err2, norm2 = err2 + err * err, norm2 + norm * norm
            modules[layer.module] = LoraModule(A, B, 1.0)
            rows.append({"module": layer.module, "kind": layer.kind, "shape": list(D.shape), "rank": r,
                         "delta_norm": norm, "rel_error": _rel(err, norm)})

    dense_change2 = sum(d["change_norm"] ** 2 for d in dense)
    pattern = {row["module"]: row["rank"] for row in rows if row["rank"] != rank}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # Absolute, so the adapter finds its base (and check_compatible compares it) from any working directory.
        "base_model_name_or_path": str(Path(sft).absolute()),
        "r": rank,
        "lora_alpha": rank,  # scaling 1: the SVD factors are the delta as they are
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": _target_modules(layers, module_names),
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    report = {
        "backbone": str(Path(backbone).absolute()), "sft": str(Path(sft).absolute()), "rank": rank,
        "svd": "torch.linalg.svd, float64 (optimal truncation)" if svd == "full"
        else "torch.svd_lowrank, float32, niter=4 (randomized)",
        "dtype": dtype,
        "overall_rel_error": _rel(math.sqrt(err2), math.sqrt(norm2)),
        # What the adapter misses of the whole fine-tune: the truncation AND the dense drift it cannot carry.
        "overall_rel_error_all": _rel(math.sqrt(err2 + dense_change2), math.sqrt(norm2 + dense_change2)),
        "layers": rows,
        "dense_tolerance": dense_tolerance, "dense_drift_allowed": bool(allow_dense_drift),
        "dense_drifted": len(drifted), "dense": dense,
    }
    adapter = LoraAdapter(config, modules)
    if out_dir is not None:
        report["seconds"] = round(time.perf_counter() - started, 3)
        adapter.save(out_dir, force=force, extra_files={EXTRACT_REPORT_NAME: json.dumps(report, indent=2) + "\n"})
    report["seconds"] = round(time.perf_counter() - started, 3)
    return Extraction(adapter, report)


def format_report(report: dict, *, max_dense: int = 10) -> str:
    """The report as text: one row per linear layer, the overall errors, then the dense parameters that drifted."""
    lines = [f"rank {report['rank']} LoRA of {report['backbone']} on {report['sft']} ({report['svd']})",
             "| layer | shape [out, in] | rank | ||D||_F | ||D - D_r||_F / ||D||_F |", "|---|---|---|---|---|"]
    for row in report["layers"]:
        lines.append(f"| {row['module']} | {row['shape'][0]} x {row['shape'][1]} | {row['rank']} | "
                     f"{row['delta_norm']:.4g} | {row['rel_error']:.4f} |")
    lines.append(f"overall (linear layers): {report['overall_rel_error']:.4f}; over all parameters (dense drift "
                 f"included): {report['overall_rel_error_all']:.4f}")
    drifted = sorted((d for d in report["dense"] if d["rel_change"] > report["dense_tolerance"]),
                     key=lambda d: -d["rel_change"])
    if drifted:
        lines.append(f"{len(drifted)} parameter(s) a LoRA cannot carry drifted (kept at the SFT's values; relative "
                     f"change, largest first):")
        lines += [f"  {d['key']} ({d['kind']}): {d['rel_change']:.4g}" for d in drifted[:max_dense]]
        if len(drifted) > max_dense:
            lines.append(f"  ... and {len(drifted) - max_dense} more (see {EXTRACT_REPORT_NAME})")
    else:
        lines.append(f"no parameter outside the linear layers differs from the SFT (tolerance "
                     f"{report['dense_tolerance']:g})")
    return "\n".join(lines)
