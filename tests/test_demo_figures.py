"""The demo figures quoted in the README, the Space README and the model card equal
``benchmarks/demo/results/demo_figures.json`` (written by ``benchmarks/demo/figures.py``; nothing is rerun here)."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "benchmarks" / "demo"
QUOTES = json.loads((DEMO / "quotes.json").read_text())
FIGURES = json.loads((DEMO / "results" / "demo_figures.json").read_text())
FIX = "rerun python benchmarks/demo/figures.py --write_docs (or --docs_only)"


def _lookup(key: str):
    value = FIGURES
    for part in key.split("."):
        value = value[part]
    return value


def _regex(sentence: str) -> tuple[re.Pattern, list[tuple[str, str]]]:
    """The same reading of a quote as figures.py's (any whitespace run matches any other), written again here so that
    the check does not depend on the code it checks."""
    parts, fields = [], []
    for literal, name, spec, _ in string.Formatter().parse(sentence):
        parts.append(r"\s+".join(re.escape(w) for w in re.split(r"\s+", literal)))
        if name is not None:
            parts.append(r"([-\w.]+)")
            fields.append((name, spec or ""))
    return re.compile("".join(parts)), fields


def test_quotes_cover_the_three_documents():
    assert {q["file"] for q in QUOTES} >= {
        "README.md",
        "spaces/metashield/README.md",
        "model_cards/metashield-base/README.md",
    }


@pytest.mark.parametrize("quote", QUOTES, ids=lambda q: f"{q['file']}:{q['sentence'][:40]}")
def test_quoted_figures_equal_the_results(quote):
    text = (REPO / quote["file"]).read_text(encoding="utf-8")
    regex, fields = _regex(quote["sentence"])
    matches = list(regex.finditer(text))
    assert len(matches) == 1, f"{quote['file']}: the quote {quote['sentence']!r} is found {len(matches)} times; {FIX}"
    for i, (name, spec) in enumerate(fields, start=1):
        expected = format(_lookup(name), spec)
        assert matches[0].group(i) == expected, (
            f"{quote['file']}: {name} is {matches[0].group(i)}, not {expected}; {FIX}"
        )


def test_a_drifted_figure_is_caught():
    quote = next(q for q in QUOTES if "{detect.default.tpr" in q["sentence"])
    text = (REPO / quote["file"]).read_text(encoding="utf-8")
    regex, fields = _regex(quote["sentence"])
    match = regex.search(text)
    i = [n for n, _ in fields].index("detect.default.tpr") + 1
    drifted = text[: match.start(i)] + "0.306" + text[match.end(i) :]
    assert regex.search(drifted).group(i) != format(FIGURES["detect"]["default"]["tpr"], fields[i - 1][1])
