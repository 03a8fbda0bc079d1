"""bonesoup: the Bone Soup / MAGE method on top of soupkernels.

Knows models, checkpoints and preferences: merge coefficients, checkpoint
I/O, the offline merge, live re-merge inside a serving process (LiveSoup)
and the command line (``bonesoup --help``).
"""

from bonesoup.coefficients import (
    backbone_matrix,
    bone_coefficients,
    fold_extrapolation,
    merge_coefficients,
    rewarded_soup_coefficients,
    validate_preference,
)
from bonesoup.live import LiveSoup, RemergeInfo
from bonesoup.offline_merge import merge_checkpoints

__all__ = [
    "backbone_matrix",
    "bone_coefficients",
    "rewarded_soup_coefficients",
    "fold_extrapolation",
    "merge_coefficients",
    "validate_preference",
    "merge_checkpoints",
    "LiveSoup",
    "RemergeInfo",
]
