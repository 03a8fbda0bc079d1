"""``bonesoup serve``: OpenAI-compatible completions over a live Bone Soup.

Modules: :mod:`~bonesoup.serve.protocol` (pydantic request models, OpenAI
error objects), :mod:`~bonesoup.serve.app` (FastAPI routes),
:mod:`~bonesoup.serve.engine` (the scheduler that owns the model),
:mod:`~bonesoup.serve.metrics` (prometheus_client) and
:mod:`~bonesoup.serve.cli` (the command line, ``ServerThread``).

The command-line names import without fastapi; the app, engine and protocol
names load on first use.
"""

from bonesoup.serve.cli import (  # noqa: F401
    SERVE_DEMO_DIR,
    ServerThread,
    add_serve_parser,
    build_embedded_default,
    build_from_args,
    cmd_serve,
    load_live_soup,
    main,
)

_LAZY = {
    "create_app": "bonesoup.serve.app", "DEFAULT_MAX_TOKENS_LIMIT": "bonesoup.serve.protocol",
    "DEFAULT_MAX_BODY_BYTES": "bonesoup.serve.protocol", "Engine": "bonesoup.serve.engine",
    "Metrics": "bonesoup.serve.metrics", "RequestError": "bonesoup.serve.protocol",
    "CompletionRequest": "bonesoup.serve.protocol", "PreferenceRequest": "bonesoup.serve.protocol",
}

__all__ = ["CompletionRequest", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_TOKENS_LIMIT", "Engine", "Metrics",
           "PreferenceRequest", "RequestError", "SERVE_DEMO_DIR", "ServerThread", "add_serve_parser",
           "build_embedded_default", "build_from_args", "cmd_serve", "create_app", "load_live_soup", "main"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bonesoup.serve' has no attribute {name!r}")
