"""The zoo's text tokenizers: a deterministic BPE/WordPiece learner, the same ids in every process."""

import json
import os
import subprocess
import sys

import pytest

from metashield_hf.zoo.text import learn_merges, train_tokenizer

TEXTS = [
    "the film is a charming, funny and moving story",
    "a dull, lifeless and boring mess of a movie",
    "lower the newest widest lowest",
] * 3


def test_learn_merges_known_answer():
    # Sennrich et al.'s example: e+s and s+t tie at 9; the tie goes to the smaller pair, then "es"+"t".
    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
    assert learn_merges(counts, "", 3) == [("e", "s"), ("es", "t"), ("l", "o")]
    # WordPiece: non-initial symbols carry the prefix, and the joined token keeps only the first one's.
    assert learn_merges(counts, "##", 2) == [("##e", "##s"), ("##es", "##t")]


def test_learn_merges_ignores_insertion_order():
    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3, "wide": 3}
    shuffled = dict(reversed(list(counts.items())))
    assert learn_merges(counts, "##", 20) == learn_merges(shuffled, "##", 20)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_tokenizer_covers_its_texts_and_round_trips(arch):
    # RoBERTa's vocabulary starts with the 256 byte symbols; these few texts have fewer merges than asked for.
    vocab_size = 120 if arch == "bert" else 300
    tok = train_tokenizer(TEXTS, arch, vocab_size=vocab_size, max_length=32)
    assert 60 < len(tok) <= vocab_size
    assert len(tok.get_vocab()) == len(set(tok.get_vocab().values()))  # ids are distinct
    ids = tok(TEXTS)["input_ids"]
    assert tok.unk_token_id not in {i for row in ids for i in row}
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == TEXTS[0]
    assert "token_type_ids" in tok(TEXTS[0]) if arch == "bert" else "token_type_ids" not in tok(TEXTS[0])


_PROBE = """
import json
from metashield_hf.zoo.build import resolve_data_root
from metashield_hf.zoo.text import load_text, train_tokenizer
texts = load_text("sst2", str(resolve_data_root(None)))[0][:1500]
tok = train_tokenizer(texts, {arch!r}, 1500, 48)
print(json.dumps([sorted(tok.get_vocab().items()), tok(texts[:100])["input_ids"]]))
"""


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_same_vocabulary_and_ids_in_every_process(arch):
    # Hash-map order differs between processes. With `tokenizers`' own trainers, 4 processes gave 4 different
    # 1500-token vocabularies from these 1500 SST-2 sentences (ties near the cut-off are broken in that order).
    out = []
    for seed in ("1", "2"):
        run = subprocess.run(
            [sys.executable, "-c", _PROBE.format(arch=arch)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONHASHSEED=seed),
            check=True,
        )
        out.append(run.stdout.strip().splitlines()[-1])
    assert out[0] == out[1]
    assert len(json.loads(out[0])[0]) == 1500


@pytest.mark.parametrize("dataset", ["sst2", "mr", "ag_news", "olid", "sms_spam"])
def test_every_text_dataset_loads_with_its_label_names(dataset):
    from metashield_hf.zoo.build import resolve_data_root
    from metashield_hf.zoo.spec import NUM_CLASSES
    from metashield_hf.zoo.text import LABEL_NAMES, load_text

    assert NUM_CLASSES[dataset] == len(LABEL_NAMES[dataset])  # the zoo plan's class count (spec.py) agrees

    train_texts, train_labels, test_texts, test_labels = load_text(dataset, str(resolve_data_root(None)))
    assert len(train_texts) == len(train_labels) > len(test_texts) == len(test_labels) > 100
    # Every class of the label names occurs on both sides, and no label falls outside them.
    for labels in (train_labels, test_labels):
        assert set(labels.tolist()) == set(range(len(LABEL_NAMES[dataset])))
    assert not set(test_texts[:200]) <= set(train_texts)  # a real split, not one side twice
