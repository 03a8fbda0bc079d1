"""A task's rewards as data: the entries a config file (or ``--rewards``) names, checked, built and fingerprinted.

An entry is a string -- a registered name (``"sentiment"``), ``"hf:DIR"`` (a
sequence-classification reward model), ``"package.module:function"`` or
``"file.py:function"`` (a Python callable ``fn(prompts, responses) -> floats``)
-- or a mapping with options (:class:`RewardSpec`). :meth:`RewardSpec.check`
refuses what cannot build before anything is trained; :meth:`RewardSpec.description`
is what a trained model's cache key holds (file contents, never paths).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from bonesoup.train.rewards import _REGISTRY, RewardFn, available_rewards

__all__ = ["RewardSpec"]

#: Options of each kind of reward entry (besides the kind's own key and ``name``).
_SPEC_OPTIONS = {"builtin": ("args",),
                 "hf": ("input", "chat_template", "label", "batch_size", "device", "dtype", "max_length"),
                 "callable": ()}
#: Options that change what an ``hf`` reward model computes (part of its fingerprint; batch size and device are not).
_HF_RESULT_OPTIONS = ("input", "chat_template", "label", "dtype", "max_length")


@dataclass(frozen=True)
class RewardSpec:
    """One objective of a task as a config file names it: a built-in, an ``hf:DIR`` reward model or a callable.

    Written in a config file (or ``--rewards``) as a string -- ``"sentiment"``,
    ``"hf:DIR"``, ``"package.module:function"`` or ``"file.py:function"`` -- or as
    a mapping with one of the keys ``builtin``, ``hf``, ``callable`` and its
    options: ``{builtin: conciseness, args: {target: 8}}``, ``{hf: DIR, input:
    pair, chat_template: false, label: 1, batch_size: 16, device: cuda, dtype:
    bfloat16, max_length: 512}``; every kind takes ``name`` (for logs and tables).

    Attributes
    ----------
    kind : {"builtin", "hf", "callable"}
    target : str
        The registered name, the reward model's directory or ``module:function``.
    options : dict
        builtin: ``args`` (factory keyword arguments); hf: the
        :class:`~bonesoup.train.reward_models.SequenceClassifierReward` options.
    name : str
        Objective name in logs, tables and plots.
    """

    kind: str
    target: str
    options: dict
    name: str

    @classmethod
    def parse(cls, entry, what: str = "rewards", base_dir: str | os.PathLike | None = None) -> "RewardSpec":
        """A spec from a config entry (string or mapping); ValueError naming ``what`` for anything else.

        Relative directories and ``.py`` files resolve against ``base_dir``
        (the config file's directory) when given, else the working directory.
        """
        if isinstance(entry, RewardSpec):
            return entry
        if isinstance(entry, str):
            if not entry:
                raise ValueError(f"{what}: empty reward entry")
            if entry.startswith("hf:"):
                kind, target, options, name = "hf", entry[3:], {}, None
            elif ":" in entry:
                kind, target, options, name = "callable", entry, {}, None
            else:
                kind, target, options, name = "builtin", entry, {}, None
        elif isinstance(entry, Mapping):
            kinds = [k for k in _SPEC_OPTIONS if k in entry]
            if len(kinds) != 1:
                raise ValueError(f"{what}: a reward mapping needs exactly one of the keys {list(_SPEC_OPTIONS)}, "
                                 f"got {sorted(entry)}")
            kind = kinds[0]
            unknown = sorted(set(entry) - {kind, "name", *_SPEC_OPTIONS[kind]})
            if unknown:
                raise ValueError(f"{what}: unknown option(s) {unknown} for a {kind!r} reward; it takes "
                                 f"{['name', *_SPEC_OPTIONS[kind]]}")
            target, name = entry[kind], entry.get("name")
            options = {k: v for k, v in entry.items() if k not in (kind, "name")}
            if not isinstance(target, str) or not target:
                raise ValueError(f"{what}: {kind} must be a non-empty string, got {target!r}")
            if name is not None and (not isinstance(name, str) or not name):
                raise ValueError(f"{what}: name must be a non-empty string, got {name!r}")
            if kind == "builtin" and not isinstance(options.get("args", {}), Mapping):
                raise ValueError(f"{what}: args must be a mapping of keyword arguments, got {options['args']!r}")
        else:
            raise ValueError(f"{what}: a reward is a name, 'hf:DIR', 'module:function' or a mapping, got {entry!r}")
        base = Path(base_dir) if base_dir is not None else None
        if kind == "hf" and not target:
            raise ValueError(f"{what}: 'hf:' needs a reward-model directory ('hf:DIR')")
        if kind == "hf":
            target = str(_absolute(target, base))
        elif kind == "callable":
            module, _, function = target.rpartition(":")
            if not module or not function.isidentifier():
                raise ValueError(f"{what}: a callable reward is 'module:function' or 'file.py:function', "
                                 f"got {target!r}")
            if module.endswith(".py"):
                target = f"{_absolute(module, base)}:{function}"
        if name is None:
            name = {"builtin": target, "hf": Path(target).name, "callable": target.rpartition(":")[2]}[kind]
        return cls(kind, target, dict(options), name)

    def entry(self) -> str | dict:
        """The config entry of this spec (absolute paths): the short string form where it has no options."""
        default_name = {"builtin": self.target, "hf": Path(self.target).name,
                        "callable": self.target.rpartition(":")[2]}[self.kind]
        if not self.options and self.name == default_name:
            return self.target if self.kind != "hf" else f"hf:{self.target}"
        out = {self.kind: self.target, **self.options}
        if self.name != default_name:
            out["name"] = self.name
        return out

    def with_defaults(self, **defaults) -> "RewardSpec":
        """An ``hf`` spec with ``device`` / ``dtype`` filled in where the entry left them out (others: itself)."""
        if self.kind != "hf":
            return self
        opts = {**{k: v for k, v in defaults.items() if v is not None}, **self.options}
        return RewardSpec(self.kind, self.target, opts, self.name)

    def check(self, what: str = "rewards") -> None:
        """Refuse, without loading a reward model's weights, a spec that cannot build (ValueError naming ``what``)."""
        if self.kind == "builtin":
            if self.target not in _REGISTRY:
                raise ValueError(f"{what}: unknown reward {self.target!r}; built in: {available_rewards()}, or "
                                 "'hf:DIR' (a reward model) or 'module:function'")
            try:
                _REGISTRY[self.target](**dict(self.options.get("args", {})))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{what}: reward {self.target!r}: {e}") from None
        elif self.kind == "hf":
            from bonesoup.train.reward_models import inspect_reward_model

            o = self.options
            inspect_reward_model(self.target, label=o.get("label"), input=o.get("input", "text"),
                                 chat_template=o.get("chat_template", False), what=f"{what} (hf:{self.target})")
            for key in ("batch_size", "max_length"):
                v = o.get(key, 1)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{what}: {key} must be a positive integer, got {v!r}")
            _torch_dtype(o.get("dtype"), f"{what}: dtype")
            if o.get("device") is not None:
                try:
                    dev = torch.device(o["device"])
                except (RuntimeError, TypeError):
                    raise ValueError(f"{what}: device must be 'cpu', 'cuda' or 'cuda:N', got {o['device']!r}") from None
                if dev.type == "cuda" and not torch.cuda.is_available():
                    raise ValueError(f"{what}: device {o['device']!r} asked for, but CUDA is not available here")
        else:
            _import_callable(self.target, what)

    def build(self) -> RewardFn:
        """The reward function (a loaded reward model for ``hf``), with ``.name`` set where it can be."""
        if self.kind == "builtin":
            fn = _REGISTRY[self.target](**dict(self.options.get("args", {})))
        elif self.kind == "hf":
            from bonesoup.train.reward_models import SequenceClassifierReward

            o = dict(self.options)
            o["dtype"] = _torch_dtype(o.get("dtype"), "dtype")
            return SequenceClassifierReward(self.target, name=self.name, **o)
        else:
            fn = _import_callable(self.target, "rewards")
        try:
            if getattr(fn, "name", None) != self.name:
                fn.name = self.name
        except (AttributeError, TypeError):  # a builtin function or a frozen object: logs use the spec's name
            pass
        return fn

    def description(self) -> dict:
        """What a model trained on this reward depends on, hashed by content (never by path)."""
        from bonesoup.fingerprint import directory_fingerprint, file_fingerprint

        if self.kind == "builtin":
            return {"builtin": self.target, "args": dict(self.options.get("args", {}))}
        if self.kind == "hf":
            o = {k: self.options.get(k) for k in _HF_RESULT_OPTIONS}
            o["dtype"] = _dtype_name(o["dtype"])
            return {"hf": directory_fingerprint(self.target), **o}
        module, _, function = self.target.rpartition(":")
        source = module if module.endswith(".py") else getattr(_import_module(module, "rewards"), "__file__", None)
        return {"callable": function, "module": Path(module).name if module.endswith(".py") else module,
                "source": file_fingerprint(source) if source else None}


def _absolute(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    return (base / p if base is not None and not p.is_absolute() else p).absolute()


def _dtype_name(dtype) -> str | None:
    from soupkernels._dtypes import parse_dtype_name

    return parse_dtype_name(dtype, "dtype")


def _torch_dtype(dtype, what: str):
    from soupkernels._dtypes import parse_dtype_name

    name = parse_dtype_name(dtype, what)
    return None if name is None else getattr(torch, name)


def _import_module(module: str, what: str):
    import hashlib
    import importlib
    import importlib.util
    import sys

    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: reward file {path} not found")
        key = "bonesoup_reward_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import {module!r} ({e}); put it on PYTHONPATH or name a file.py") from None


def _import_callable(target: str, what: str) -> RewardFn:
    module, _, function = target.rpartition(":")
    fn = getattr(_import_module(module, what), function, None)
    if not callable(fn):
        raise ValueError(f"{what}: {module} has no callable {function!r}")
    return fn
