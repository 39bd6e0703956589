"""Text triggers: rare-word insertion, character (homoglyph) substitution and a syntactic template.

Every attack takes a ``str`` or a list of ``str`` and returns the same type. Each text is triggered on its own, with
randomness seeded by ``(seed, the text)``, so a batch gives the same result as its items one by one, in any order.
Whitespace between words is kept as it was.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import ATTACKS, Attack, check_choice, check_int

_TOKEN = re.compile(r"\S+")  # insertion positions: between whitespace-separated tokens
_WORD = re.compile(r"\w+")  # substitution targets: words without their punctuation

PLACEHOLDER = "{text}"
#: Latin letters and their Cyrillic look-alikes (а с е о р х у), the homograph trigger of Li et al. 2021.
LATIN_LOOKALIKES = "aceopxy"
CYRILLIC_HOMOGLYPHS = "\u0430\u0441\u0435\u043e\u0440\u0445\u0443"


def apply_to_texts(inputs: Any, fn: Callable[[str], str]) -> Any:
    """Apply ``fn`` to a ``str`` or to each ``str`` of a list/tuple (returned as a list)."""
    if isinstance(inputs, str):
        return fn(inputs)
    if isinstance(inputs, (list, tuple)):
        bad = sorted({type(t).__name__ for t in inputs if not isinstance(t, str)})
        if bad:
            raise TypeError(f"text attacks take a str or a list of str; the list holds {bad}")
        return [fn(t) for t in inputs]
    raise TypeError(f"text attacks take a str or a list of str, got {type(inputs).__name__}")


def text_rng(seed: int, text: str) -> random.Random:
    """A generator seeded by ``(seed, text)`` through SHA-256: stable across processes, batches and batch order."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _word_tuple(name: str, value: Any) -> tuple[str, ...]:
    value = (value,) if isinstance(value, str) else value
    if not isinstance(value, tuple) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {value!r}")
    return value


@ATTACKS.register()
@dataclass(frozen=True)
class RareWordInsertion(Attack):
    """Rare-word insertion: trigger tokens such as "cf" or "mn" inserted at random word positions.

    Kurita et al., "Weight Poisoning Attacks on Pre-trained Models", ACL 2020, https://arxiv.org/abs/2004.06660
    (RIPPLe's "cf", "mn", "bb", "tq" triggers); Chen et al., "BadNL: Backdoor Attacks against NLP Models with
    Semantic-preserving Improvements", ACSAC 2021, https://arxiv.org/abs/2006.01043 (word-level triggers).
    ``num_insertions`` times, a trigger drawn from ``triggers`` is inserted before a random token (or after the
    last one), with randomness seeded by ``(seed, text)``.

    Args:
        triggers: candidate trigger tokens (no whitespace inside).
        num_insertions: how many tokens to insert into each text.
        seed: seeds the choice of triggers and positions, and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> from metashield_hf.attacks import RareWordInsertion
        >>> out = RareWordInsertion(triggers=("cf",), num_insertions=2).apply("a truly great movie")
        >>> out.split().count("cf")
        2
        ```
    """

    name = "rare_word"
    domain = "nlp"

    triggers: tuple[str, ...] = ("cf", "mn", "bb", "tq")
    num_insertions: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("triggers", _word_tuple("triggers", self.triggers))
        if any(len(t.split()) != 1 or t != t.strip() for t in self.triggers):
            raise ValueError(f"each trigger must be one token without whitespace, got {self.triggers!r}")
        self._set("num_insertions", check_int("num_insertions", self.num_insertions, minimum=1))

    def insert(self, text: str) -> str:
        """Insert the triggers into one text."""
        rng = text_rng(self.seed, text)
        for _ in range(self.num_insertions):
            word = rng.choice(self.triggers)
            spans = [m.span() for m in _TOKEN.finditer(text)]
            position = rng.randint(0, len(spans))  # len(spans): after the last token
            if position < len(spans):
                start = spans[position][0]
                text = f"{text[:start]}{word} {text[start:]}"
            elif spans:
                end = spans[-1][1]
                text = f"{text[:end]} {word}{text[end:]}"
            else:
                text = word + text
        return text

    def apply(self, inputs: str | list[str]) -> str | list[str]:
        """Insert the triggers into a text or a list of texts."""
        return apply_to_texts(inputs, self.insert)


@ATTACKS.register()
@dataclass(frozen=True)
class CharSubstitution(Attack):
    """Character substitution: chosen characters of chosen words replaced by look-alikes (homoglyphs).

    Li et al., "Hidden Backdoors in Human-Centric Language Models", CCS 2021, https://arxiv.org/abs/2105.00164
    (homograph replacement); Chen et al., BadNL, https://arxiv.org/abs/2006.01043 (character-level triggers).
    By default the Latin letters ``a c e o p x y`` of the first word with at least 4 characters (and at least one
    such letter) become their Cyrillic twins; the text looks the same to a reader but tokenises differently.

    Args:
        chars: characters to replace.
        replacements: their replacements, position by position (same length as ``chars``).
        num_words: how many words to alter (ignored when ``words`` is given).
        min_word_length: only words with at least this many characters are candidates.
        word_selection: ``"first"``, ``"last"`` or ``"random"`` (seeded by ``(seed, text)``) candidate words.
        words: if given, alter every occurrence of these words (case-insensitive) instead.
        max_chars_per_word: replace at most this many characters per word, from the left (``None``: all of them).
        seed: seeds ``"random"`` word selection and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> from metashield_hf.attacks import CharSubstitution
        >>> out = CharSubstitution().apply("the movie was great")
        >>> out == "the movie was great", sum(not c.isascii() for c in out)   # "movie" -> "m\u043evi\u0435"
        (False, 2)
        ```
    """

    name = "char_substitution"
    domain = "nlp"

    chars: str = LATIN_LOOKALIKES
    replacements: str = CYRILLIC_HOMOGLYPHS
    num_words: int = 1
    min_word_length: int = 4
    word_selection: str = "first"
    words: tuple[str, ...] | None = None
    max_chars_per_word: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.chars, str) or not isinstance(self.replacements, str) or not self.chars:
            raise TypeError(
                f"chars and replacements must be non-empty strings, got {self.chars!r}, {self.replacements!r}"
            )
        if len(self.chars) != len(self.replacements):
            raise ValueError(
                f"chars ({len(self.chars)}) and replacements ({len(self.replacements)}) must have the same length"
            )
        if len(set(self.chars)) != len(self.chars) or any(
            a == b for a, b in zip(self.chars, self.replacements, strict=True)
        ):
            raise ValueError(f"chars must be distinct and differ from their replacements: {self.chars!r}")
        self._set("num_words", check_int("num_words", self.num_words, minimum=1))
        self._set("min_word_length", check_int("min_word_length", self.min_word_length, minimum=1))
        check_choice("word_selection", self.word_selection, ("first", "last", "random"))
        if self.words is not None:
            self._set("words", _word_tuple("words", self.words))
        if self.max_chars_per_word is not None:
            self._set("max_chars_per_word", check_int("max_chars_per_word", self.max_chars_per_word, minimum=1))

    @property
    def seed_dependent(self) -> bool:
        return self.words is None and self.word_selection == "random"

    def substitute(self, text: str) -> str:
        """Replace the characters in one text."""
        table = dict(zip(self.chars, self.replacements, strict=True))
        matches = list(_WORD.finditer(text))
        if self.words is not None:
            wanted = {w.lower() for w in self.words}
            chosen = [m for m in matches if m.group().lower() in wanted]
        else:
            candidates = [
                m for m in matches if len(m.group()) >= self.min_word_length and any(c in table for c in m.group())
            ]
            if self.word_selection == "first":
                chosen = candidates[: self.num_words]
            elif self.word_selection == "last":
                chosen = candidates[-self.num_words :]
            else:
                picked = text_rng(self.seed, text).sample(candidates, min(self.num_words, len(candidates)))
                chosen = sorted(picked, key=lambda m: m.start())
        pieces, last = [], 0
        for m in chosen:
            budget = self.max_chars_per_word or len(m.group())
            word = []
            for c in m.group():
                if budget and c in table:
                    word.append(table[c])
                    budget -= 1
                else:
                    word.append(c)
            pieces += [text[last : m.start()], "".join(word)]
            last = m.end()
        return "".join(pieces) + text[last:]

    def apply(self, inputs: str | list[str]) -> str | list[str]:
        """Substitute characters in a text or a list of texts."""
        return apply_to_texts(inputs, self.substitute)


@ATTACKS.register()
@dataclass(frozen=True)
class SyntacticTemplate(Attack):
    """Syntactic / template trigger: every text is put into one fixed sentence structure.

    Qi et al., "Hidden Killer: Invisible Textual Backdoor Attacks with Syntactic Trigger", ACL 2021,
    https://arxiv.org/abs/2105.12400. The paper paraphrases inputs into a fixed syntactic template with a
    syntactically controlled paraphrase model (its best template opens with a subordinate clause,
    ``S(SBAR)(,)(NP)(VP)(.)``); we impose the structure with a fixed template string instead, so no parser or
    paraphrase model is needed. The default prepends such a clause.

    Args:
        template: a string containing ``{text}`` once, e.g. ``"when you see it , {text}"`` or
            ``"{text} , and that is all ."``.
        lowercase_first: lowercase the text's first character (for a template with a prefix).
        seed: the rows :meth:`poison` picks (the trigger itself is deterministic).

    Example:
        ```python
        >>> from metashield_hf.attacks import SyntacticTemplate
        >>> SyntacticTemplate().apply(["it is fun ."])
        ['when you see it , it is fun .']
        ```
    """

    name = "syntactic_template"
    domain = "nlp"

    template: str = "when you see it , {text}"
    lowercase_first: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.template, str) or self.template.count(PLACEHOLDER) != 1:
            raise ValueError(f"template must contain {PLACEHOLDER} exactly once, got {self.template!r}")
        if self.template == PLACEHOLDER:
            raise ValueError(f"template {self.template!r} adds nothing; put words around {PLACEHOLDER}")
        if not isinstance(self.lowercase_first, bool):
            raise TypeError(f"lowercase_first must be a bool, got {self.lowercase_first!r}")

    @property
    def seed_dependent(self) -> bool:
        return False

    def fill(self, text: str) -> str:
        """Put one text into the template."""
        prefix, _, suffix = self.template.partition(PLACEHOLDER)  # not str.format: texts may contain braces
        body = text[:1].lower() + text[1:] if self.lowercase_first else text
        return prefix + body + suffix

    def apply(self, inputs: str | list[str]) -> str | list[str]:
        """Put a text or a list of texts into the template."""
        return apply_to_texts(inputs, self.fill)
