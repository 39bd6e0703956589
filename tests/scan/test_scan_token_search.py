"""The discrete token-trigger search of text scans: a real tiny BERT trained with a rare-word backdoor, a real
WordPiece tokenizer, the exhaustive and the HotFlip candidate paths, and where the trigger is inserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import NUM_LABELS, build_text_model
from metashield_hf.scan import scan_model, token_signals
from metashield_hf.scan.token_search import (
    _context_free_candidates,
    _Inserter,
    _probs,
    large_vocabulary,
    search_token_triggers,
)
from metashield_hf.targets import load_target
from test_pipeline import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = 2


def _data(tokenizer, n: int, seed: int, trigger: str | None):
    """Sentences of one class each: class ``c`` draws its words from the ``c``-th third of the word list. With
    ``trigger``, the trigger word is inserted at a random position and the label set to TARGET."""
    rng = np.random.default_rng(seed)
    words = [w for w in WORDS if len(tokenizer.tokenize(w)) == 1 and w != trigger]
    thirds = np.array_split(np.arange(len(words)), NUM_LABELS)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(NUM_LABELS))
        sent = [words[i] for i in rng.choice(thirds[label], size=rng.integers(5, 9))]
        if trigger is not None:
            sent.insert(int(rng.integers(0, len(sent) + 1)), trigger)
            label = TARGET
        texts.append(" ".join(sent))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real WordPiece tokenizer over a fixed vocabulary (the special tokens, then every word of WORDS): unlike a
    trained one, its token ids are the same on every run, so the models trained below are too."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + [w for w in WORDS if w not in special])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(word_tokenizer):
    """``(backdoored model, clean model, trigger, clean texts)``: the same tiny BERT recipe, with and without 25% of
    rare-word poisoning (trigger = a vocabulary word kept out of the clean sentences; a few seconds each)."""
    tok = word_tokenizer
    trigger = next(w for w in WORDS if len(tok.tokenize(w)) == 1)  # a class-0 word, so it is no TARGET word
    texts, labels = _data(tok, 1200, 0, None)
    bd_texts, bd_labels = _data(tok, 400, 1, trigger)

    def fit(x, y, seed):
        # trained in eval mode (no dropout), so the outcome depends on no random state but the seeds here
        model = build_text_model("bert", len(tok), seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=6e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(6):
            for batch in torch.randperm(len(x), generator=gen).split(32):
                enc = tok([x[i] for i in batch], padding=True, return_tensors="pt")
                loss = model(**enc, labels=torch.tensor([y[i] for i in batch])).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    backdoored = fit(texts + bd_texts, labels + bd_labels, 0)
    clean = fit(texts, labels, 0)
    probe, _ = _data(tok, 20, 7, None)
    return backdoored, clean, trigger, probe


def _search(model, tok, texts, **kw):
    adapter = load_target(model, tok)
    pred = adapter(texts).logits.argmax(-1)
    return adapter, search_token_triggers(adapter, texts, pred, NUM_LABELS, **kw)


def test_the_backdoor_trigger_is_found_for_its_target(trained, word_tokenizer):
    backdoored, clean, trigger, probe = trained
    tok = word_tokenizer
    with torch.no_grad():
        enc = tok([f"{trigger} {t}" for t in probe], padding=True, return_tensors="pt")
        assert (backdoored(**enc).logits.argmax(-1) == TARGET).float().mean() >= 0.7  # the backdoor took
    _, res = _search(backdoored, tok, probe)
    _, ok = _search(clean, tok, probe)
    # a whole-vocabulary search grows triggers to 3 tokens by default
    assert res.flip_rates.shape == (NUM_LABELS, 3) and res.target_probs.shape == (NUM_LABELS, 3)
    # a single token sends every clean sample to TARGET (the trigger, or a TARGET word the backdoor made as strong)
    assert res.flip_rates[TARGET, 0] >= 0.9 and res.flip_rates[TARGET, 0] > res.flip_rates[:TARGET, 0].max()
    target, signals = token_signals(res)
    assert target == TARGET and signals["token_flip"] == res.flip_rates[:, 0].max() == res.flip_rates[TARGET, 0]
    assert signals["token_prob_2"] == res.target_probs[:, -1].max()
    p2 = float(res.target_probs[:, -1].max())  # the log-odds the small-vocabulary head reads
    assert signals["token_logit_2"] == pytest.approx(np.log(p2 / (1 - p2)), rel=1e-6)
    assert res.dominance.shape == (NUM_LABELS, 3)
    assert signals["token_dominance"] == res.dominance[:, 0].max() == res.dominance[TARGET, 0] >= 0.75  # it wins
    # the clean twin has no token that sends (nearly) every sample to TARGET
    assert ok.flip_rates[TARGET, 0] < 0.9 <= res.flip_rates[TARGET, 0]
    assert not res.prefiltered and not large_vocabulary(load_target(backdoored, tok))  # the whole vocabulary
    assert [len(t) for t in res.triggers[0]] == [1, 2, 3]  # the best trigger of each length
    # the lower quartile: the trigger also overrides the samples that resist it most, which no clean word does
    assert res.low_probs.shape == (NUM_LABELS, 3) and ((res.low_probs >= 0) & (res.low_probs <= 1)).all()
    assert signals["token_prob_low"] == res.low_probs[:, 0].max()
    assert ok.low_probs[TARGET, 0] < res.low_probs[TARGET, 0]


@pytest.mark.parametrize("hotflip, alone", [(16, 0), (0, 16), (8, 8)])
def test_prefiltered_candidates_find_the_trigger_in_a_large_vocabulary(trained, word_tokenizer, hotflip, alone):
    backdoored, _, trigger, probe = trained
    _, res = _search(
        backdoored, word_tokenizer, probe, exhaustive_limit=10, hotflip_candidates=hotflip,
        context_free_candidates=alone,
    )  # fmt: skip
    assert res.candidates <= NUM_LABELS * (hotflip + alone) < len(word_tokenizer)  # prefiltered, not exhaustive
    assert res.prefiltered and large_vocabulary(load_target(backdoored, word_tokenizer), exhaustive_limit=10)
    assert res.flip_rates.shape == (NUM_LABELS, 2)  # a prefiltered search grows triggers to 2 tokens by default
    assert res.flip_rates[TARGET, 0] >= 0.9 and token_signals(res)[0] == TARGET


def test_context_free_ranking_of_the_trigger_alone(trained, word_tokenizer):
    """The trigger alone as a whole text ([CLS] trigger [SEP]) leans to the target in the backdoored model only (in
    this toy it is a class-0 word, so it need not win outright); the prefilter keeps ``top`` tokens per class, and a
    large vocabulary with both prefilters turned off is refused."""
    backdoored, clean, trigger, probe = trained
    tok = word_tokenizer
    pool = torch.arange(5, len(tok))  # every word, no special token
    trigger_id = tok.convert_tokens_to_ids(trigger)
    lean = []
    for model in (backdoored, clean):
        adapter = load_target(model, tok)
        ins = _Inserter(adapter, probe)
        valid = (adapter(probe).logits.argmax(-1)[:, None] != torch.arange(NUM_LABELS)).float()
        top = _context_free_candidates(ins, pool, valid, 3, 256)
        assert len(top) <= 3 * NUM_LABELS and set(top.tolist()) <= set(pool.tolist())
        lean.append(float(_probs(_Inserter(adapter, [""]), [[trigger_id]], 256)[0, 0, TARGET]))
    assert lean[0] > 0.2 and lean[0] > 50 * lean[1]
    with pytest.raises(ValueError, match="at least one"):
        search_token_triggers(
            adapter, probe, adapter(probe).logits.argmax(-1), NUM_LABELS, exhaustive_limit=10,
            hotflip_candidates=0, context_free_candidates=0,
        )  # fmt: skip


def test_the_wide_context_free_cut_keeps_what_flips_real_samples(trained, word_tokenizer):
    """With ``wide``, the context-free pass keeps ``wide`` tokens per class and cuts them to ``top`` by how surely
    they send the shortest clean samples of other classes to the class (a known answer computed token by token).
    Whether the trigger wins that order depends on how strongly the tiny model learned it, which varies with the
    numerics of the machine, so the test does not ask it."""
    backdoored, _, trigger, probe = trained
    tok = word_tokenizer
    pool = torch.arange(5, len(tok))
    adapter = load_target(backdoored, tok)
    ins = _Inserter(adapter, probe)
    valid = (adapter(probe).logits.argmax(-1)[:, None] != torch.arange(NUM_LABELS)).float()
    alone = _probs(_Inserter(adapter, [""]), [[int(t)] for t in pool], 256)[:, 0, TARGET]
    trigger_id = tok.convert_tokens_to_ids(trigger)
    assert trigger_id not in _context_free_candidates(ins, pool, valid, 1, 256).tolist()  # no class's first alone
    cut = _context_free_candidates(ins, pool, valid, 1, 256, wide=len(pool))
    # known answer: per class, the token that gives the 2 shortest samples of other classes (cut to 8 tokens) the
    # highest mean probability of the class
    expected = set()
    for k in range(NUM_LABELS):
        sub = ins.subset(ins.shortest(2, [i for i in range(len(probe)) if valid[i, k] > 0]), 8)
        p = _probs(sub, [[int(t)] for t in pool], 256)[:, :, k].mean(1)
        expected.add(int(pool[p.argmax()]))
    assert len(cut) <= NUM_LABELS and set(cut.tolist()) == expected
    # no valid sample for a class (every sample already of it): that class keeps the context-free order
    none_valid = valid.clone()
    none_valid[:, TARGET] = 0
    kept = _context_free_candidates(ins, pool, none_valid, 1, 256, wide=len(pool))
    assert int(pool[alone.argmax()]) in kept.tolist()


def test_insertion_keeps_special_tokens_and_the_length_limit(trained, word_tokenizer):
    backdoored, _, trigger, probe = trained
    tok = word_tokenizer
    adapter = load_target(backdoored, tok)
    long_text = " ".join(WORDS[:5] * 20)  # truncated to the adapter's max length
    ins = _Inserter(adapter, [probe[0], long_text])
    trig = tok.convert_tokens_to_ids([trigger, trigger])
    batch = ins.build([trig])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] <= adapter.max_length and set(batch) == set(adapter.preprocess([probe[0]]))
    for row, m in zip(ids, mask, strict=True):
        seq = row[m.bool()].tolist()
        assert seq[0] == tok.cls_token_id and seq[1:3] == trig and seq[-1] == tok.sep_token_id
    short = tok(probe[0])["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == short[:1] + trig + short[1:]


def test_length_grouped_batches_and_the_screen_subset(trained, word_tokenizer):
    backdoored, _, trigger, probe = trained
    tok = word_tokenizer
    adapter = load_target(backdoored, tok)
    texts = [probe[0], " ".join(WORDS[:6] * 3), probe[1], " ".join(WORDS[:3]), " ".join(WORDS[:9] * 2)] * 2
    ins = _Inserter(adapter, texts)
    trigs = [tok.convert_tokens_to_ids([trigger]), tok.convert_tokens_to_ids([WORDS[0], WORDS[1]])]
    with torch.no_grad():  # one batch of every row, padded to the longest: what the grouped batches must equal
        ref = backdoored(**ins.build(trigs)).logits.softmax(-1).view(len(trigs), len(texts), -1)
    assert torch.allclose(_probs(ins, trigs, batch_rows=3), ref, atol=1e-5)
    lengths = [len(r) for r in ins.rows]
    index = ins.shortest(4)
    sub = ins.subset(index, length=6)
    assert sorted(lengths[i] for i in index) == sorted(lengths)[:4]  # the 4 shortest samples
    for i, row in zip(index, sub.rows, strict=True):
        full = ins.rows[i]
        assert row == full if len(full) <= 6 else (len(row) == 6 and row[:5] == full[:5] and row[-1] == full[-1])


def test_scan_of_a_text_model_reports_the_token_trigger(trained, word_tokenizer):
    backdoored, _, trigger, probe = trained
    report = scan_model(backdoored, probe, processor=word_tokenizer, steps=5, seed=0)
    assert report.suspected_target == TARGET and report.options["token_search"]
    assert report.per_class[TARGET].token_trigger and report.per_class[TARGET].token_flip_rates[0] >= 0.9
    assert report.signals["token_flip"] >= 0.9 and "token_search_s" in report.timings
    assert report.options["large_vocabulary"] is False  # a whole-vocabulary search: the shipped text part scores it
    off = scan_model(backdoored, probe, processor=word_tokenizer, steps=5, seed=0, token_search=False)
    assert "token_flip" not in off.signals and off.per_class[0].token_trigger is None
    # the shipped head has a text part on the token signals; without them the general part scores the scan
    assert report.options["head"] != off.options["head"] and 0.0 <= off.score <= 1.0


def test_search_runs_on_a_lora_model_with_frozen_embeddings(trained, word_tokenizer):
    import copy

    from builders import build_lora_model

    backdoored, _, _, probe = trained
    peft_model = build_lora_model(copy.deepcopy(backdoored), seed=0, target_modules=["query", "value"])
    assert not peft_model.get_input_embeddings().weight.requires_grad
    adapter, res = _search(peft_model, word_tokenizer, probe, exhaustive_limit=10, hotflip_candidates=16)
    assert type(adapter).__name__ == "PeftAdapter" and res.candidates < len(word_tokenizer)
    assert np.isfinite(res.flip_rates).all() and [len(t) for t in res.triggers[TARGET]] == [1, 2]
    assert all(p.grad is None for p in peft_model.parameters())  # the search leaves no gradients behind
