"""Discrete trigger search for text classifiers: which few inserted tokens force a class.

Text backdoors are keyed on tokens (a rare word, a homoglyph that tokenises to an odd piece, a template's opening
words), and a continuous perturbation of the embedding layer ([`metashield_hf.synthesis`]) is a poor stand-in for
them: it can push *any* class everywhere, so clean and backdoored models look alike. Here the trigger is searched in
the model's own vocabulary, in the spirit of T-Miner / DBS / PICCOLO (Azizi et al. 2021, Shen et al. 2022, Liu et al.
2022) but without their generator or relaxation: every candidate token is inserted right after the sequence's
leading special token (``[CLS]`` / ``<s>``) of each clean sample, and the fraction of samples it sends to each class
is measured; a beam then grows the best triggers one token at a time.

A backdoored model has a short token sequence that flips nearly every clean sample to its target, whatever the
sample says; for a clean model the best single token of a class is a strong class word ("awful", "terrible"), which
moves only the samples that were close to the boundary. Unlike the anomaly index over classes, this works with two
classes too.

Candidates are the whole vocabulary (minus special tokens other than the unknown token) when it has at most
``exhaustive_limit`` entries. For larger vocabularies (pretrained checkpoints, 30k-250k entries) two cheap rankings
each pick their most promising tokens per class, which are then measured exactly:

- *context-free*: every token alone as the whole text (``[CLS] t [SEP]``, three positions per token). A trigger word
  was trained to decide the class by itself; but where natural class words alone are near-certain too, a trigger ties
  with hundreds of them, so the pass keeps 1024 tokens per class and cuts them to the 128 that most surely flip two
  short clean samples of the other classes;
- *HotFlip* (Ebrahimi et al. 2018): the first-order gain of each token at the insertion slot of the clean samples.

The two rankings miss different triggers, hence both (the ranks they give real triggers are in
``benchmarks/scan/README.md``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..targets.base import TargetAdapter
from ..targets.transformers_models import unwrap
from .progress import tqdm_disable

logger = logging.getLogger(__name__)

_LENGTH_GROUP = 5  # samples per length group in _probs

__all__ = ["TokenSearchResult", "large_vocabulary", "search_token_triggers", "trigger_outputs"]


@dataclass
class TokenSearchResult:
    """Per-class outcome of [`search_token_triggers`] (``K`` classes).

    Attributes:
        flip_rates: ``(K, L)`` flip rate of the best trigger of length ``1..L`` for each class (fraction of the clean
            samples not already of that class that it sends there).
        target_probs: ``(K, L)`` mean probability of the class under that trigger, same samples.
        low_probs: ``(K, L)`` lower quartile of that probability over the same samples: how hard the trigger pushes
            the samples that resist it most (a backdoor overrides them too; a natural class word does not).
        dominance: ``(K, L)`` fraction of samples (all of them) that class k's best trigger of length ``j`` still
            sends to k when the ``opposing`` best single tokens of every other class are inserted with it.
        triggers: ``K`` lists of ``L`` token-id lists, the best trigger of each length.
        trigger_texts: the longest best trigger of each class, decoded.
        candidates: how many distinct tokens were measured exactly.
        prefiltered: whether the vocabulary was too large to screen whole ([`large_vocabulary`]), so the candidates
            come from the prefilters.
    """

    flip_rates: np.ndarray
    target_probs: np.ndarray
    low_probs: np.ndarray
    dominance: np.ndarray
    triggers: list[list[list[int]]]
    trigger_texts: list[str]
    candidates: int
    prefiltered: bool = False


EXHAUSTIVE_LIMIT = 8192  # default of search_token_triggers(exhaustive_limit=...)


def _skipped(tok) -> set[int]:
    """Vocabulary ids no trigger uses: the special tokens, but for the unknown token."""
    return {i for i in tok.all_special_ids if i < len(tok)} - {tok.unk_token_id}


def large_vocabulary(adapter: TargetAdapter, exhaustive_limit: int = EXHAUSTIVE_LIMIT) -> bool:
    """Whether [`search_token_triggers`] prefilters this text model's vocabulary (more than ``exhaustive_limit``
    candidate tokens: pretrained checkpoints, 30k-250k tokens) rather than screening all of it."""
    tok = _tokenizer_of(adapter)[0]
    return len(tok) - len(_skipped(tok)) > exhaustive_limit


def _tokenizer_of(adapter: TargetAdapter):
    inner = getattr(adapter, "inner", adapter)  # a PeftAdapter runs its base family's adapter
    tok = getattr(inner, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{type(adapter).__name__} has no tokenizer; the token trigger search needs a text model")
    return tok, getattr(inner, "max_length", None)


class _Inserter:
    """Builds batches of clean samples with a trigger inserted after the leading special token."""

    def __init__(self, adapter: TargetAdapter, items: list):
        self.adapter = adapter
        self.tok, max_length = _tokenizer_of(adapter)
        enc = adapter.preprocess(items)
        ids, mask = enc["input_ids"], enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        self.names = set(enc)
        self.rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        special = set(self.tok.all_special_ids)
        self.offset = 1 if self.rows and self.rows[0] and self.rows[0][0] in special else 0
        self.ends_special = bool(self.rows and self.rows[0] and self.rows[0][-1] in special)
        self.max_length = max_length or max(len(r) for r in self.rows) + 8
        pad = self.tok.pad_token_id
        self.pad = 0 if pad is None else int(pad)

    def shortest(self, m: int, among: list[int] | None = None) -> list[int]:
        """Indices of the ``m`` shortest clean samples (of those in ``among``, default all), in their original order
        (the cheapest rows to run)."""
        index = range(len(self.rows)) if among is None else among
        return sorted(sorted(index, key=lambda i: (len(self.rows[i]), i))[:m])

    def subset(self, index: list[int], length: int | None = None) -> _Inserter:
        """The same inserter on the clean samples ``index``, each cut to at most ``length`` tokens (a final special
        token kept)."""
        sub = copy.copy(self)
        rows = [self.rows[i] for i in index]
        if length is not None:
            end = 1 if self.ends_special else 0  # keep a final [SEP] / </s>
            rows = [r if len(r) <= length else r[: length - end] + r[len(r) - end :] for r in rows]
        sub.rows = rows
        return sub

    def build(self, triggers: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows ``trigger-major``: all clean samples with ``triggers[0]``, then with ``triggers[1]``, ..."""
        seqs = []
        for trig in triggers:
            for row in self.rows:
                seq = row[: self.offset] + list(trig) + row[self.offset :]
                extra = len(seq) - self.max_length
                if extra > 0:  # drop the sample's own last tokens, keeping a final [SEP] / </s>
                    keep_end = seq[-1:] if self.ends_special else []
                    seq = seq[: len(seq) - len(keep_end) - extra] + keep_end
                seqs.append(seq)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return {k: v for k, v in batch.items() if k in self.names or k == "input_ids"}


def _probs(ins: _Inserter, triggers: list[list[int]], batch_rows: int) -> torch.Tensor:
    """``(len(triggers), N, K)`` class probabilities of the clean samples with each trigger inserted.

    The samples run in groups of similar length (each group with every trigger), so a batch is padded to its own
    longest sample rather than to the longest of all.
    """
    n = len(ins.rows)
    by_length = sorted(range(n), key=lambda i: len(ins.rows[i]))
    groups = [by_length[i : i + _LENGTH_GROUP] for i in range(0, n, _LENGTH_GROUP)]
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for group in groups:
            sub = ins.subset(group)
            per = max(1, batch_rows // len(group))
            for start in range(0, len(triggers), per):
                batch = {k: v.to(ins.adapter.device) for k, v in sub.build(triggers[start : start + per]).items()}
                logits = ins.adapter.forward(batch).float().cpu()
                probs = logits.softmax(-1).view(-1, len(group), logits.shape[-1])
                if out is None:
                    out = torch.zeros(len(triggers), n, probs.shape[-1])
                out[start : start + probs.shape[0], group] = probs
    return out


def trigger_outputs(adapter: TargetAdapter, items: list, triggers: list[list[int]], batch_rows: int = 256):
    """``TargetOutput`` (logits, penultimate) of the clean ``items`` with each token trigger inserted where the
    search inserts it: ``len(triggers) * N`` rows, trigger-major (what the scan feeds the input-level detector)."""
    from ..targets.base import TargetOutput

    ins = _Inserter(adapter, items)
    per = max(1, batch_rows // max(1, len(ins.rows)))
    outs = []
    with torch.inference_mode():
        for start in range(0, len(triggers), per):
            outs.append(adapter.run_prepared(ins.build(triggers[start : start + per])))
    return TargetOutput.cat(outs)


def _class_stats(probs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, N, K)`` probabilities → per (trigger, class) flip rate and mean class probability over valid samples."""
    hit = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float()  # (T, N, K)
    w = valid / valid.sum(0, keepdim=True).clamp_min(1.0)  # (N, K)
    return (hit * w).sum(1), (probs * w).sum(1)


def _slot_gains(
    ins: _Inserter, pool: torch.Tensor, valid: torch.Tensor, prefix: list[int], classes: list[int] | None = None
) -> torch.Tensor:
    """``(P, len(classes))`` first-order (HotFlip) estimate of how much putting each ``pool`` token in the slot right
    after ``prefix`` raises each class's mean log-probability over its valid samples (default: every class)."""
    model = unwrap(ins.adapter.model)
    emb = model.get_input_embeddings()
    slot = ins.tok.unk_token_id if ins.tok.unk_token_id is not None else int(pool[0])
    batch = {k: v.to(ins.adapter.device) for k, v in ins.build([[*prefix, slot]]).items()}
    captured: dict = {}

    def hook(_m, _a, out):
        if not out.requires_grad:  # frozen embeddings (a LoRA model): make the output a leaf that takes gradients
            out = out.detach().requires_grad_(True)
        captured["e"] = out
        return out

    handle = emb.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logp = ins.adapter.forward(batch).float().log_softmax(-1)  # (N, K)
            w = valid.to(logp.device) / valid.sum(0).clamp_min(1.0).to(logp.device)
            grads = []
            for k in range(logp.shape[1]) if classes is None else classes:
                g = torch.autograd.grad((logp[:, k] * w[:, k]).sum(), captured["e"], retain_graph=True)[0]
                grads.append(g[:, ins.offset + len(prefix)].sum(0))  # (H,) the slot's gradient over samples
    finally:
        handle.remove()
    weight = emb.weight.detach().float()[pool.to(emb.weight.device)]  # (P, H)
    return (weight @ torch.stack(grads).T.float().to(weight.device)).cpu()


def _top_per_class(pool: torch.Tensor, scores: torch.Tensor, top: int) -> torch.Tensor:
    """The ``pool`` tokens among the ``top`` highest ``scores`` ``(P, K)`` of any class (union over classes)."""
    picks = scores.topk(min(top, len(pool)), dim=0).indices  # (top, K)
    return pool[picks.flatten().unique()]


def _hotflip_candidates(ins: _Inserter, pool: torch.Tensor, valid: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` tokens per class with the largest first-order gain at the insertion slot (union over classes)."""
    return _top_per_class(pool, _slot_gains(ins, pool, valid, []), top)


def _context_free_candidates(
    ins: _Inserter,
    pool: torch.Tensor,
    valid: torch.Tensor,
    top: int,
    batch_rows: int,
    *,
    wide: int = 0,
    samples: int = 2,
    length: int = 8,
) -> torch.Tensor:
    """The ``top`` tokens per class that the model, given each token alone as its whole text (``[CLS] t [SEP]``),
    puts in that class with the highest probability (union over classes).

    A backdoor trigger word was trained to decide the class by itself, so on its own it often classifies as the
    target more surely than any natural word. Three positions per vocabulary entry make this the one ranking cheap
    enough to measure every token exactly, at a fraction of the screen's cost per token. But in a model whose
    natural class words already classify alone with probability near 1, the trigger ties with hundreds of them
    (``benchmarks/scan/README.md`` quotes the ranks). So with ``wide > top`` the ``wide`` best per
    class are kept first, and cut to ``top`` by the mean class probability they give the ``samples`` shortest clean
    samples of the other classes, cut to ``length`` tokens: a trigger flips a real text, a class word on its own
    mostly does not.
    """
    alone = _Inserter(ins.adapter, [""])  # the tokenizer's own special tokens around an empty text
    scores = _probs(alone, [[int(t)] for t in pool], batch_rows)[:, 0]  # (P, K)
    if wide <= top:
        return _top_per_class(pool, scores, top)
    picks = []
    for k in range(scores.shape[1]):
        wide_k = pool[scores[:, k].topk(min(wide, len(pool))).indices]
        others = [i for i in range(len(ins.rows)) if valid[i, k] > 0]
        if not others:  # every clean sample is already of class k: nothing to flip, keep the context-free order
            picks.append(wide_k[:top])
            continue
        sub = ins.subset(ins.shortest(samples, others), length)
        probs = _probs(sub, [[int(t)] for t in wide_k], batch_rows)[:, :, k].mean(1)
        picks.append(wide_k[probs.topk(min(top, len(wide_k))).indices])
    return torch.cat(picks).unique()


def search_token_triggers(
    adapter: TargetAdapter,
    items: list,
    clean_pred: torch.Tensor,
    num_classes: int,
    *,
    max_tokens: int | None = None,
    beam: int = 2,
    extend_candidates: int = 8,
    extend_hotflip: int = 8,
    opposing: int = 3,
    screen_samples: int = 6,
    screen_length: int | None = 16,
    rescore: int = 64,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
    hotflip_candidates: int = 128,
    context_free_candidates: int = 128,
    context_free_wide: int = 1024,
    batch_rows: int = 2048,
    progress: bool | None = None,
) -> TokenSearchResult:
    """Search each class's best trigger of 1..``max_tokens`` tokens among the model's vocabulary.

    Every candidate token is first screened on ``screen_samples`` clean samples (ranked by the mean probability it
    gives each class); the ``rescore`` best per class are then measured on all samples, and a beam grows the best
    ones by one token per round. Finally each class's best triggers are pitted against the ``opposing`` best single
    tokens of every other class, all inserted together (in both orders): the *dominance* of a class is the fraction
    of samples its trigger still wins. A backdoor trigger was trained to override whatever the text says, so it
    wins (dominance near 1); a natural class word is outvoted by a few strong words of the other classes.

    Args:
        adapter: a text target adapter (transformers or PEFT) with its tokenizer.
        items: the clean texts.
        clean_pred: ``(N,)`` the model's predictions on them (samples already of a class do not count for it).
        num_classes: ``K``.
        max_tokens: longest trigger tried (a beam adds one token per round); default 3 where the whole vocabulary
            is screened, 2 where it is prefiltered: a beam round costs little in a small vocabulary and minutes in a
            pretrained one, where the third token tends to be a natural word.
        beam: triggers kept per class between rounds.
        extend_candidates: the best single tokens of a class that the beam may append.
        extend_hotflip: tokens with the best HotFlip estimate after each beam entry that it may append as well.
        opposing: best single tokens of each other class inserted against a class's trigger for its dominance.
        screen_samples: the shortest clean samples used to screen the whole candidate list (all when >= ``N``).
        screen_length: the screen's samples are cut to at most this many tokens (``None``: not cut); a screen on
            short texts ranks tokens by how hard they push, at a fraction of the cost of full-length texts.
        rescore: tokens per class measured on all samples after the screen.
        exhaustive_limit: screen every vocabulary token when there are at most this many; else prefilter them.
        hotflip_candidates: tokens per class kept by the HotFlip estimate for large vocabularies.
        context_free_candidates: tokens per class kept for large vocabularies by the class probability of the token
            alone (``[CLS] t [SEP]``); their union with the HotFlip picks is screened. The context-free pass costs
            three positions per vocabulary entry.
        context_free_wide: with more than ``context_free_candidates``, the context-free pass first keeps this many
            tokens per class, then the ``context_free_candidates`` of them that give the class the highest mean
            probability on the 2 shortest clean samples of other classes, cut to 8 tokens (``0``: no such cut).
        batch_rows: perturbed sequences per forward pass.
        progress: a tqdm bar on stderr over the search's stages (prefilter, screen, each class's beam, dominance),
            named after the current one (``None``: only when stderr is a terminal).

    Returns:
        A [`TokenSearchResult`]; deterministic (no randomness is involved).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ins = _Inserter(adapter, items)
    skip = _skipped(ins.tok)
    pool = torch.tensor([i for i in range(len(ins.tok)) if i not in skip], dtype=torch.long)
    n = len(ins.rows)
    valid = (clean_pred.cpu()[:, None] != torch.arange(num_classes)[None, :]).float()  # (N, K)
    prefiltered = len(pool) > exhaustive_limit
    if max_tokens is None:
        max_tokens = 2 if prefiltered else 3
    if prefiltered and hotflip_candidates <= 0 and context_free_candidates <= 0:
        raise ValueError(
            f"a vocabulary of {len(pool)} tokens (> exhaustive_limit={exhaustive_limit}) needs at least one "
            "prefilter: hotflip_candidates or context_free_candidates > 0"
        )
    prefilters = int(hotflip_candidates > 0) + int(context_free_candidates > 0) if prefiltered else 0
    bar = tqdm(total=prefilters + num_classes + 2, desc="token search", unit="stage", disable=tqdm_disable(progress))
    if prefiltered:
        picks = []  # only the prefilters asked for run (each costs a pass over the vocabulary)
        if hotflip_candidates > 0:
            bar.set_description("token search: HotFlip prefilter")
            picks.append(_hotflip_candidates(ins, pool, valid, hotflip_candidates))
            bar.update()
        if context_free_candidates > 0:
            bar.set_description("token search: context-free prefilter")
            picks.append(
                _context_free_candidates(ins, pool, valid, context_free_candidates, batch_rows, wide=context_free_wide)
            )
            bar.update()
        pool = torch.cat(picks).unique()
    # 1. screen every candidate on a few samples, by the mean class probability it gives (smoother than flips)
    m = min(screen_samples, n) if screen_samples > 0 else n
    # the shortest samples, cut short: a screen needs only a rough ranking, and these rows are the cheapest
    index = ins.shortest(m)
    screen = ins.subset(index, screen_length)
    bar.set_description(f"token search: screen {len(pool)} tokens")
    _, prob_s = _class_stats(_probs(screen, [[int(t)] for t in pool], batch_rows), valid[index])
    bar.update()
    shortlist = prob_s.topk(min(rescore, len(pool)), dim=0).indices  # (R, K)
    flips = np.zeros((num_classes, max_tokens))
    tprobs = np.zeros((num_classes, max_tokens))
    lows = np.zeros((num_classes, max_tokens))
    best: list[list[list[int]]] = [[] for _ in range(num_classes)]
    top_singles: list[list[int]] = []
    for k in range(num_classes):
        bar.set_description(f"token search class {k + 1}/{num_classes}")
        # 2. the shortlist on all samples, ranked by flip rate (ties: mean class probability)
        cands = [[int(pool[i])] for i in shortlist[:, k]]
        for length in range(max_tokens):
            probs = _probs(ins, cands, batch_rows)
            f, q = _class_stats(probs, valid)
            rank = f[:, k] + 1e-3 * q[:, k]
            order = rank.argsort(descending=True)
            if length == 0:
                singles = [cands[i][0] for i in order[:extend_candidates].tolist()]
                top_singles.append(singles)
            flips[k, length], tprobs[k, length] = float(f[order[0], k]), float(q[order[0], k])
            mine = probs[order[0], valid[:, k] > 0, k]
            lows[k, length] = float(mine.quantile(0.25)) if len(mine) else 0.0
            best[k].append(cands[int(order[0])])
            beams = [cands[i] for i in order[:beam].tolist()]
            if length + 1 == max_tokens:
                break
            # 3. the beam: append one of the class's best single tokens, or a token HotFlip expects to help after
            # this beam (a trigger word split into word pieces, "c ##f", is no pair of good single tokens)
            cands = []
            for b in beams:
                gain = _slot_gains(ins, pool, valid, b, [k])[:, 0]
                extra = pool[gain.topk(min(extend_hotflip, len(pool))).indices].tolist()
                cands += [b + [t] for t in dict.fromkeys(singles + extra)]
        bar.update()
    against = [
        [t for u in range(num_classes) if u != k for t in top_singles[u][:opposing]] for k in range(num_classes)
    ]
    dominance = np.zeros((num_classes, max_tokens))
    bar.set_description("token search: dominance")
    for j in range(max_tokens):
        trigs = [t for k in range(num_classes) for t in (best[k][j] + against[k], against[k] + best[k][j])]
        pred = _probs(ins, trigs, batch_rows).argmax(-1)  # (2K, N)
        dominance[:, j] = (pred.view(num_classes, -1) == torch.arange(num_classes)[:, None]).float().mean(1).numpy()
    bar.update()
    bar.close()
    texts = [ins.tok.decode(b[-1]) for b in best]
    return TokenSearchResult(
        flip_rates=flips,
        target_probs=tprobs,
        low_probs=lows,
        dominance=dominance,
        triggers=best,
        trigger_texts=texts,
        candidates=int(len(pool)),
        prefiltered=prefiltered,
    )
