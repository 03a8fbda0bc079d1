"""The ``bonesoup`` model loader: vLLM's default loader, run once per stored model into flat arenas.

Registered with vLLM as ``load_format="bonesoup"``. The engine's model
directory is the SFT model (config, tokenizer, and the last stored row); the
backbone directories come in ``model_loader_extra_config["bonesoup_backbones"]``.
Each is read by vLLM's own weight iterator and ``model.load_weights``, so what
is stored is exactly what vLLM would have loaded for that checkpoint on this
rank. vLLM's post-load processing (CPU prepacking) runs afterwards as usual, on
the SFT weights; :class:`~bonesoup.vllm.arena.SoupArena` takes it from there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from .arena import SoupArena

__all__ = ["LOAD_FORMAT", "BACKBONES_KEY", "PUBLISH_KEY", "SoupModelLoader", "find_arena"]

LOAD_FORMAT = "bonesoup"
#: The key of ``model_loader_extra_config`` that lists the backbone directories (in preference order).
BACKBONES_KEY = "bonesoup_backbones"
#: How merged weights reach vLLM's kernels: "repack" (re-run post-load processing) or "views" (see SoupArena).
PUBLISH_KEY = "bonesoup_publish"
_ARENA_ATTR = "_bonesoup_arena"


@register_model_loader(LOAD_FORMAT)
class SoupModelLoader(DefaultModelLoader):
    """Loads the SFT model and every backbone, each through vLLM's weight loading, into a :class:`SoupArena`."""

    def __init__(self, load_config):
        extra = dict(load_config.model_loader_extra_config or {})
        backbones = extra.pop(BACKBONES_KEY, None)
        if not isinstance(backbones, (list, tuple)) or len(backbones) < 1 or \
                not all(isinstance(b, str) for b in backbones):
            raise ValueError(f"load_format={LOAD_FORMAT!r} needs model_loader_extra_config[{BACKBONES_KEY!r}]: a "
                             f"list of backbone directories, got {backbones!r}")
        self.backbones = list(backbones)
        self.publish = extra.pop(PUBLISH_KEY, "repack")
        if self.publish not in ("repack", "views"):
            raise ValueError(f"model_loader_extra_config[{PUBLISH_KEY!r}] must be 'repack' or 'views', "
                             f"got {self.publish!r}")
        # The default loader refuses keys it does not know: hand it the rest only. It
        # reads every checkpoint as safetensors (never pickles).
        super().__init__(dataclasses.replace(load_config, load_format="safetensors",
                                             model_loader_extra_config=extra))

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        if self.publish == "views":  # after vLLM's post-load processing, before any forward or compile
            find_arena(model).compute_on_views()
        return model

    def load_weights(self, model, model_config) -> None:
        sources = self.backbones + [model_config.model]
        for s in self.backbones:
            if not (Path(s) / "config.json").is_file():
                raise FileNotFoundError(f"backbone {s!r} is not a checkpoint directory (no config.json)")
        from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size, model_parallel_is_initialized

        # plans and checks memory (on CPU every tensor-parallel rank fills its arena from the same RAM at once)
        ranks = get_tensor_model_parallel_world_size() if model_parallel_is_initialized() else 1
        arena = SoupArena(model, sources, host_ranks=ranks)

        def load_row(row: int):
            if row == len(self.backbones):  # the SFT model: the engine's own source, as the default loader reads it
                return super(SoupModelLoader, self).load_weights(model, model_config)
            src = DefaultModelLoader.Source(self.backbones[row], None, prefix="",
                                            fall_back_to_pt=False,
                                            allow_patterns_overrides=getattr(model, "allow_patterns_overrides", None))
            try:
                loaded = model.load_weights(self._get_weights_iterator(src))
                if loaded is not None:
                    self.track_weights_loading(model, loaded)  # vLLM's own check: names a weight missing
            except Exception as e:  # a shape or key that does not fit the SFT model's architecture
                raise ValueError(f"backbone {self.backbones[row]!r} does not load into the model of "
                                 f"{model_config.model!r}: {type(e).__name__}: {e}") from e
            return loaded

        arena.capture(load_row)
        setattr(model, _ARENA_ATTR, arena)


def find_arena(model) -> SoupArena:
    """The arena the loader attached to ``model`` (looking through wrappers), or RuntimeError."""
    for _ in range(4):  # compile / CUDA-graph wrappers keep the model under one of these names
        arena = getattr(model, _ARENA_ATTR, None)
        if arena is not None:
            return arena
        model = next((getattr(model, a) for a in ("runnable", "module", "model") if hasattr(model, a)), None)
        if model is None:
            break
    raise RuntimeError(f"no bonesoup arena on this worker's model: the engine must be started with "
                       f"load_format={LOAD_FORMAT!r} (bonesoup.vllm.SoupLLM / AsyncSoup do that)")
