"""Reward functions, the registry, the combinations and the normalisation."""

import numpy as np
import pytest
import torch

from bonesoup.merge.coefficients import backbone_matrix
from bonesoup.train.rewards import (
    CombinedReward,
    Conciseness,
    Coverage,
    Length,
    Readability,
    RewardNormalization,
    SequenceClassifierReward,
    Sentiment,
    available_rewards,
    combination_weights,
    count_syllables,
    flesch_reading_ease,
    get_reward,
    register_reward,
)


def test_registry_has_the_built_ins_and_takes_callables():
    assert {"sentiment", "readability", "conciseness", "length", "coverage", "reward_model"} <= set(
        available_rewards())
    assert isinstance(get_reward("conciseness", target=4), Conciseness)
    with pytest.raises(ValueError, match="reward must be a callable or one of"):
        get_reward("helpfulness")

    def shouting(prompts, responses):
        return [float(r.isupper()) for r in responses]

    assert get_reward(shouting) is shouting
    register_reward("shouting", lambda: shouting)
    assert get_reward("shouting")(["p"], ["HI"]) == [1.0]


def test_sentiment_is_vader_compound_on_the_response():
    s = Sentiment()
    out = s(["The hotel was"] * 4, [" great.", " terrible.", "", " great and wonderful, we loved it."])
    assert out[0] == pytest.approx(0.6249) and out[1] < -0.4 and out[2] == 0.0 and out[3] > out[0]


def test_flesch_reading_ease():
    assert [count_syllables(w) for w in ("cat", "table", "reading", "the", "beautiful", "cake")] == [1, 2, 2, 1, 3, 1]
    text = "The cat sat on the mat. It was happy."
    words, sentences, syllables = 9, 2, 10
    expected = 206.835 - 1.015 * words / sentences - 84.6 * syllables / words
    assert flesch_reading_ease(text) == pytest.approx(expected)
    assert flesch_reading_ease("") == 0.0
    r = Readability()(["p", "p"], [" The cat sat.", " Notwithstanding considerable institutional complexity."])
    assert r[0] > 1.0 > r[1]


def test_conciseness_length_coverage():
    c = Conciseness(target=4)
    assert c(["p"] * 3, ["", " one two", " a b c d e f"]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="target"):
        Conciseness(target=0)
    assert Length()(["p"], [" it's three words"]) == [3.0]
    cov = Coverage(keywords=["clean", "friendly"])
    assert cov(["p", "p"], [" Clean and friendly.", " cleanly"]) == [1.0, 0.0]
    overlap = Coverage()
    assert overlap(["The hotel staff"], [" the staff were kind"]) == [0.5]  # hotel missing, staff present
    assert overlap(["The"], [" anything"]) == [0.0]
    with pytest.raises(ValueError, match="same length"):
        c(["p"], ["a", "b"])


def test_combination_weights():
    assert combination_weights(3, expert=1).tolist() == [0.0, 1.0, 0.0]
    np.testing.assert_array_equal(combination_weights(3, backbone=2, beta=0.8), backbone_matrix(3, 0.8)[2])
    assert combination_weights(2, backbone=0, beta=0.7).tolist() == pytest.approx([0.7, 0.3])
    assert combination_weights(2, preference=[0.25, 0.75]).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="exactly one of"):
        combination_weights(2, expert=0, backbone=1, beta=0.7)
    with pytest.raises(ValueError, match="beta is required"):
        combination_weights(2, backbone=0)
    with pytest.raises(ValueError, match="expert must be an integer in"):
        combination_weights(2, expert=2)
    with pytest.raises(ValueError, match="preference must sum to 1"):
        combination_weights(2, preference=[0.5, 0.6])
    with pytest.raises(ValueError, match="beta"):
        combination_weights(2, backbone=0, beta=1.2)


def test_combined_reward_weights_normalised_rewards():
    def r0(prompts, responses):
        return [float(len(r)) for r in responses]

    def r1(prompts, responses):
        return [1.0] * len(responses)

    norm = RewardNormalization(mean=(2.0, 1.0), std=(2.0, 0.5))
    comb = CombinedReward([r0, r1], [0.7, 0.3], names=["chars", "one"], normalization=norm)
    out = comb(["p", "p"], ["abcd", ""])
    assert out.objectives.tolist() == [[4.0, 1.0], [0.0, 1.0]]  # raw, for logs
    torch.testing.assert_close(out.score, torch.tensor([0.7 * 1.0, 0.7 * -1.0]))
    plain = CombinedReward(["conciseness", "length"], [0.5, 0.5])
    assert plain.names == ["conciseness", "length"]
    with pytest.raises(ValueError, match="weights must be 2 finite numbers"):
        CombinedReward([r0, r1], [1.0])
    with pytest.raises(ValueError, match="returned shape"):
        CombinedReward([lambda p, r: [1.0], r1], [0.5, 0.5])(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="non-finite"):
        CombinedReward([lambda p, r: [float("nan")] * len(r), r1], [0.5, 0.5])(["a"], ["x"])


def test_normalization_fit_and_round_trip(tmp_path):
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    n = RewardNormalization.fit(x)
    assert n.mean == (3.0, 5.0) and n.std[0] == pytest.approx(2.0) and n.std[1] == 1e-3  # constant: centred only
    torch.testing.assert_close(n.apply(x)[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    (tmp_path / "n.json").write_text(__import__("json").dumps(n.to_dict()))
    assert RewardNormalization.load(tmp_path / "n.json") == n
    with pytest.raises(ValueError, match="std"):
        RewardNormalization.from_dict({"mean": [0.0], "std": [0.0]})
    with pytest.raises(ValueError, match="shape"):
        RewardNormalization.fit(torch.zeros(1, 2))


def test_sequence_classifier_reward_matches_a_direct_forward(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from bonesoup.tasks.tiny_models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, num_labels=2,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2ForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = SequenceClassifierReward(tmp_path / "rm", label=1, batch_size=2)
    prompts, responses = ["The user asks", "A", "Thank you"], [" politely.", " b c d e", "!"]
    got = rm(prompts, responses)
    model = rm.model
    for p, r, g in zip(prompts, responses, got):
        enc = tok(p + r, return_tensors="pt")
        with torch.no_grad():
            assert model(**enc).logits[0, 1].item() == pytest.approx(g, abs=1e-5)
    with pytest.raises(ValueError, match="label must be in"):
        SequenceClassifierReward(tmp_path / "rm", label=2)
