"""Merging: coefficients (Bone Soup, Rewarded Soup, extrapolation), checkpoint I/O, the offline
merge and LiveSoup (in-place re-merges inside a serving process). Imports no transformers."""
