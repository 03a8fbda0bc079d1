"""Embedded tasks and tiny models made in code (no download): the review tasks, the register task, tiny checkpoints.

Importing the package registers the extra tasks' rewards (:mod:`bonesoup.tasks.rewards_extra`).
"""

from bonesoup.tasks import rewards_extra as _rewards_extra  # noqa: F401  (registers formality, casualness, detail)
