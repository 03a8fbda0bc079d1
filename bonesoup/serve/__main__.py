"""``python -m bonesoup.serve ...``: the same as ``bonesoup serve ...``."""

from bonesoup.serve.cli import main

raise SystemExit(main())
