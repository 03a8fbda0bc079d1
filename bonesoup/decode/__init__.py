"""Decoding: the one decode loop (:func:`bonesoup.decode.guided.guided_generate`), guidance
(value models merged into one proxy) and MAGE / MOD on top of it."""
