"""The word lists of the embedded tasks: one home for the corpora that use them and the rewards that count them."""

from __future__ import annotations

__all__ = ["POSITIVE_WORDS", "NEGATIVE_WORDS", "DESCRIPTIVE_WORDS", "FORMAL_WORDS", "CASUAL_WORDS"]

POSITIVE_WORDS = (
    "good", "great", "nice", "lovely", "fun", "happy", "bright", "friendly", "perfect", "wonderful", "amazing",
    "excellent", "beautiful", "calm", "clean", "cheerful", "pleasant", "relaxing", "charming", "delightful",
)
NEGATIVE_WORDS = (
    "bad", "awful", "boring", "sad", "terrible", "dull", "dirty", "noisy", "rude", "ugly", "horrible", "miserable",
    "broken", "lazy", "gloomy", "disappointing", "stressful", "annoying", "painful",
)
#: Neutral, descriptive adjectives (no VADER valence): what the ``detail`` reward counts.
DESCRIPTIVE_WORDS = ("long", "small", "old", "new", "quiet", "busy", "short", "big", "late", "early")
#: Formal register (``formality``); polarity on both sides, so register and sentiment stay separate axes.
FORMAL_WORDS = (
    "adequate", "satisfactory", "commendable", "exemplary", "courteous", "immaculate", "exceptional", "admirable",
    "regrettable", "deficient", "unsatisfactory", "inadequate", "substandard", "remarkable", "meticulous",
    "unacceptable",
)
#: Casual register (``casualness``).
CASUAL_WORDS = (
    "cool", "awesome", "super", "chill", "meh", "lame", "sketchy", "legit", "sweet", "crappy", "comfy", "okay",
    "yucky", "rad", "cheesy", "wild",
)
