"""``bonesoup serve``: OpenAI-compatible completions over a live Bone Soup."""

from bonesoup.serve.server import *  # noqa: F401,F403
from bonesoup.serve.server import __all__  # noqa: F401
