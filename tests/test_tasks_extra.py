"""The extra embedded tasks: their rewards on hand-made texts, the conflict directions, the corpora, the registry."""

import numpy as np
import pytest

from bonesoup.tasks import register, review, review3
from bonesoup.tasks.lexicons import CASUAL_WORDS, DESCRIPTIVE_WORDS, FORMAL_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS
from bonesoup.tasks.registry import get_task, task_names
from bonesoup.train.rewards import available_rewards, get_reward


def score(name, texts):
    return np.asarray(get_reward(name)([""] * len(texts), texts))


def test_the_rewards_are_registered_by_name():
    assert {"formality", "casualness", "detail"} <= set(available_rewards())


def test_formality_and_casualness_follow_their_formulas():
    texts = [" commendable and courteous.", " cool, comfy and legit.", " adequate and chill.", " small.", "",
             " Adequate, COOL and cool."]
    # words W, formal F, casual C per text
    W = np.array([3, 4, 3, 1, 0, 4])
    F = np.array([2, 0, 1, 0, 0, 1])
    C = np.array([0, 3, 1, 0, 0, 2])
    np.testing.assert_allclose(score("formality", texts), (1 - 0.5 ** F) - C / np.maximum(W, 1), rtol=0, atol=1e-15)
    np.testing.assert_allclose(score("casualness", texts), (1 - 0.5 ** C) - F / np.maximum(W, 1), rtol=0, atol=1e-15)


def test_the_register_conflict_is_two_sided():
    """A response moved towards one register raises that reward and lowers the other, in both directions."""
    mixed = " adequate and cool."
    more_formal = [" adequate and courteous.", " adequate, exemplary and courteous."]
    more_casual = [" comfy and cool.", " comfy, legit and cool."]
    f0, c0 = score("formality", [mixed])[0], score("casualness", [mixed])[0]
    for t in more_formal:
        assert score("formality", [t])[0] > f0 and score("casualness", [t])[0] < c0, t
    for t in more_casual:
        assert score("casualness", [t])[0] > c0 and score("formality", [t])[0] < f0, t
    # Diminishing returns: the mixture beats the midpoint of the two pure lists on the sum (mixing pays).
    pure_f, pure_c = " adequate, exemplary and courteous.", " comfy, legit and cool."
    mix = " adequate, legit and courteous."
    total = lambda t: score("formality", [t])[0] + score("casualness", [t])[0]  # noqa: E731
    assert total(mix) > (total(pure_f) + total(pure_c)) / 2


def test_detail_counts_descriptive_words_only():
    texts = [" small, quiet and old.", " lovely and great.", " busy but lovely.", ""]
    np.testing.assert_allclose(score("detail", texts), [1 - 0.5 ** 3, 0.0, 0.5, 0.0], rtol=0, atol=1e-15)
    # one more descriptive word raises detail and costs conciseness
    assert score("detail", [" quiet and small."])[0] > score("detail", [" quiet."])[0]
    assert score("conciseness", [" quiet and small."])[0] < score("conciseness", [" quiet."])[0]


def test_the_lexicons_do_not_overlap():
    lex = [POSITIVE_WORDS, NEGATIVE_WORDS, DESCRIPTIVE_WORDS, FORMAL_WORDS, CASUAL_WORDS]
    words = [w for x in lex for w in x]
    assert len(words) == len(set(words))


def test_the_corpora_hold_every_kind_of_ending():
    corpus = register.task_corpus()
    assert len(corpus) == 5 * len(review.task_prompts("all")) and corpus == register.task_corpus()
    f = score("formality", corpus)
    c = score("casualness", corpus)
    # pure formal, pure casual and mixed sentences all occur (the SFT model must see every mixture)
    assert (f > 0.4).any() and (c > 0.4).any() and ((f > 0) & (c > 0)).any()
    three = review3.task_corpus()
    assert set(review.task_corpus()) <= set(three) and len(three) == 6 * len(review.task_prompts("all"))
    d = score("detail", three)
    s = score("sentiment", three)
    assert ((d > 0) & (np.abs(s) > 0.3)).sum() >= len(review.task_prompts("all"))  # the mixed lists


def test_the_tasks_are_registered_with_their_rewards():
    assert {"review", "register", "review3"} <= set(task_names())
    assert get_task("register").rewards == ("formality", "casualness")
    assert get_task("review3").rewards == ("sentiment", "conciseness", "detail")
    for name in ("register", "review3"):
        t = get_task(name)
        assert t.prompts("test") == review.task_prompts("test")  # the review prompts and held-out split
        assert not set(t.prompts("test")) & set(t.prompts("train"))
    with pytest.raises(ValueError, match="embedded tasks"):
        get_task("nope")


def test_the_register_sft_builds_and_is_cached(tmp_path):
    """The SFT builds from the corpus (one home: corpus_sft) and a second call finds it."""
    import json

    from bonesoup.tasks.corpus_sft import build_corpus_sft

    corpus = register.task_corpus()[:64]
    d = build_corpus_sft(tmp_path / "sft", corpus, corpus, steps=3, batch_size=4)
    fp = json.loads((d / "bonesoup-sft.json").read_text())["fingerprint"]
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert build_corpus_sft(tmp_path / "sft", corpus, corpus, steps=3, batch_size=4) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    other = build_corpus_sft(tmp_path / "sft", corpus[:32], corpus, steps=3, batch_size=4)  # another corpus: rebuilt
    assert json.loads((other / "bonesoup-sft.json").read_text())["fingerprint"] != fp
