"""Known answers for the text triggers, computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from metashield_hf.attacks import POISONED_COLUMN, CharSubstitution, RareWordInsertion, SyntacticTemplate

CYRILLIC = {"а", "с", "е", "о", "р", "х", "у"}  # the Cyrillic homoglyphs under test


def _homoglyphs(text: str) -> int:
    return sum(c in CYRILLIC for c in text)


def test_rare_word_inserted_the_right_number_of_times():
    text = "the film was a quiet delight"
    out = RareWordInsertion(triggers=("cf",), num_insertions=3, seed=1).apply(text)
    assert out.split().count("cf") == 3
    assert [w for w in out.split() if w != "cf"] == text.split()  # the original words, in order


def test_rare_word_draws_from_the_trigger_list():
    triggers = ("cf", "mn", "bb", "tq")
    texts = [f"sentence number {i} is here" for i in range(30)]
    outs = RareWordInsertion(triggers=triggers, num_insertions=2, seed=0).apply(texts)
    inserted = [w for out in outs for w in out.split() if w in triggers]
    assert len(inserted) == 60 and set(inserted) == set(triggers)
    positions = {out.split().index(next(w for w in out.split() if w in triggers)) for out in outs}
    assert len(positions) > 2  # positions vary


def test_rare_word_per_text_seeding_and_whitespace():
    attack = RareWordInsertion(seed=5)
    texts = ["alpha beta gamma delta", "one two three four five", "x y"]
    assert attack.apply(texts) == [attack.apply(t) for t in texts]
    assert attack.apply(texts[::-1]) == attack.apply(texts)[::-1]
    seeds = [RareWordInsertion(seed=s).apply(texts[1]) for s in range(8)]
    assert len(set(seeds)) > 1
    out = RareWordInsertion(triggers=("cf",), num_insertions=4).apply("first line\nsecond  line")
    assert out.count("\n") == 1 and "second  line" in out.replace("cf ", "").replace(" cf", "")
    assert RareWordInsertion(triggers=("cf",)).apply("") == "cf"


def test_rare_word_validation():
    with pytest.raises(ValueError, match="one token without whitespace"):
        RareWordInsertion(triggers=("c f",))
    with pytest.raises(ValueError, match="non-empty list of non-empty strings"):
        RareWordInsertion(triggers=())
    with pytest.raises(ValueError, match="num_insertions must be >= 1"):
        RareWordInsertion(num_insertions=0)
    assert RareWordInsertion(triggers="cf").triggers == ("cf",)


def test_char_substitution_known_answers():
    assert CharSubstitution().apply("the movie was great") == "the m\u043evi\u0435 was great"
    text = "The cat sat on a mat, people cooperate"
    # candidates (>= 4 chars, with a mappable letter): "people" (p e o p e: 5) and "cooperate" (c o o p e a e: 7)
    assert _homoglyphs(CharSubstitution(num_words=2).apply(text)) == 12
    assert _homoglyphs(CharSubstitution(num_words=5).apply(text)) == 12
    assert _homoglyphs(CharSubstitution(num_words=2, max_chars_per_word=1).apply(text)) == 2
    assert CharSubstitution(word_selection="last").apply(text).endswith("\u0441\u043e\u043e\u0440\u0435r\u0430t\u0435")
    out = CharSubstitution(words=("cat", "MAT")).apply(text)
    assert out == "The \u0441\u0430t sat on a m\u0430t, people cooperate"  # c, a in "cat" and a in "mat"
    assert CharSubstitution().apply("I do it") == "I do it"  # no candidate word: unchanged


def test_char_substitution_random_selection_is_seeded():
    text = "people cooperate happily across every season"
    picks = {CharSubstitution(word_selection="random", seed=s).apply(text) for s in range(10)}
    assert len(picks) > 1 and all(_homoglyphs(p) > 0 for p in picks)
    one = CharSubstitution(word_selection="random", seed=3)
    assert one.seed_dependent and one.apply(text) == one.apply([text, "other"])[0]


def test_char_substitution_validation():
    with pytest.raises(ValueError, match="must have the same length"):
        CharSubstitution(chars="ab", replacements="x")
    with pytest.raises(ValueError, match="differ from their replacements"):
        CharSubstitution(chars="a", replacements="a")
    with pytest.raises(ValueError, match="word_selection must be one of"):
        CharSubstitution(word_selection="middle")


def test_syntactic_template():
    assert SyntacticTemplate().apply("The movie is fun .") == "when you see it , The movie is fun ."
    lower = SyntacticTemplate(lowercase_first=True).apply(["The movie is fun ."])
    assert lower == ["when you see it , the movie is fun ."]
    suffix = SyntacticTemplate(template="{text} , and that is all .")
    assert suffix.apply("a {braced} text") == "a {braced} text , and that is all ."
    with pytest.raises(ValueError, match=r"must contain \{text\} exactly once"):
        SyntacticTemplate(template="no placeholder")
    with pytest.raises(ValueError, match="adds nothing"):
        SyntacticTemplate(template="{text}")


def test_poisoned_texts_carry_the_trigger(sentences_dataset):
    attack = RareWordInsertion(triggers=("cf",), num_insertions=2, seed=2)
    out = attack.poison(sentences_dataset, rate=0.3, target=0)
    poisoned = np.asarray(out[POISONED_COLUMN])
    assert poisoned.sum() == 6
    assert all(t.split().count("cf") == 2 for t in np.asarray(out["text"])[poisoned])
    assert not any("cf" in t.split() for t in np.asarray(out["text"])[~poisoned])
    assert (np.asarray(out["id"]) == np.arange(20)).all()  # other columns untouched
    formatted = attack.poison(sentences_dataset.with_format("numpy", columns=["label"]), rate=0.3, target=0)
    assert formatted.format["type"] == "numpy" and formatted.format["columns"] == ["label"]
