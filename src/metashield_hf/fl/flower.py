"""Flower glue: build train replies from client updates, and run any Flower strategy's own aggregation on them.

Krum, Multi-Krum, Bulyan, trimmed mean and median are *Flower's* implementations
(``flwr.serverapp.strategy``), run through their ``aggregate_train`` on the same replies the MetaShield screen sees;
nothing is re-implemented. Which clients a selection rule kept is read from what the strategy hands to its
``train_metrics_aggr_fn`` (Krum, Multi-Krum and Bulyan pass exactly the selected replies).

Each round runs Flower's own round protocol, ``configure_train`` then ``aggregate_train``, so strategies that keep
per-round state work too: the server-side DP clipping wrappers (``DifferentialPrivacyServerSideFixedClipping``,
``...AdaptiveClipping``) take the round's global model from ``configure_train`` and clip each reply's difference to
it; the adaptive one updates its clipping norm in ``aggregate_train``, so reuse one instance across rounds
(``flower_defence`` does). Their Gaussian noise is drawn from NumPy's global RNG: seed it for a repeatable run.

Requires ``flwr`` (``pip install "metashield-hf[fl]"``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.supercore.task_identity import TaskIdentity
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "metashield_hf.fl.flower needs Flower: pip install 'metashield-hf[fl]' (or pip install 'flwr>=1.42')"
    ) from err

from .screen import candidate_state

StateDict = dict[str, torch.Tensor]


def build_replies(
    models: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    node_ids: Sequence[int] | None = None,
    *,
    server_round: int = 1,
    extra_metrics: Sequence[Mapping[str, float]] | None = None,
) -> list[Message]:
    """Flower train replies as a ``ClientApp`` returns them: ``{"arrays": ArrayRecord, "metrics": MetricRecord}``.

    Args:
        models: each client's local model state dict (what a Flower client sends back, not a delta).
        num_examples: ``num-examples`` of each reply (FedAvg's weight).
        node_ids: each reply's ``src_node_id`` (default ``1..K``).
        server_round: the round (the replies' ``group_id``, as Flower's strategies set it).
        extra_metrics: more metrics per reply.

    Returns:
        Reply ``Message``\\ s with metadata built directly (no running SuperLink is needed).

    Example:
        ```python
        >>> replies = build_replies([model_a.state_dict(), model_b.state_dict()], [120, 80])
        >>> FedAvg().aggregate_train(1, replies)[0].to_torch_state_dict()
        ```
    """
    ids = list(range(1, len(models) + 1)) if node_ids is None else list(node_ids)
    out = []
    for k, (state, n) in enumerate(zip(models, num_examples, strict=True)):
        metrics = {"num-examples": int(n), **(dict(extra_metrics[k]) if extra_metrics else {})}
        content = RecordDict(
            {
                "arrays": ArrayRecord({name: t.detach().cpu() for name, t in state.items()}),
                "metrics": MetricRecord(metrics),
            }
        )
        meta = Metadata(
            run_id=0, message_id=f"reply-{server_round}-{ids[k]}", src_node_id=int(ids[k]), dst_node_id=0,
            reply_to_message_id=f"instruction-{server_round}-{ids[k]}", group_id=str(server_round),
            created_at=time.time(), ttl=3600.0, message_type="train",
        )  # fmt: skip
        out.append(Message(metadata=meta, content=content))
    return out


class _RoundGrid(Grid):
    """The round's clients as the ``Grid`` a strategy's ``configure_train`` samples nodes from. Nothing is sent
    through it: the replies are built from the in-process clients' updates."""

    def __init__(self, node_ids: Sequence[int]):
        self.node_ids = [int(i) for i in node_ids]

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def _no_messaging(self, *args, **kwargs):
        raise NotImplementedError("_RoundGrid only lists the round's nodes; replies come from build_replies")

    set_run = create_message = push_messages = pull_messages = send_and_receive = _no_messaging
    run = property(_no_messaging)


@contextmanager
def _task_identity() -> Iterator[None]:
    """Instruction ``Message``\\ s (what ``configure_train`` builds) are stamped with the process's task identity,
    which Flower's runtime sets for a run; outside one, set placeholders as ``run_simulation``'s legacy path does
    (run 0 and server node 0, as ``build_replies`` addresses them), and put back what was there."""
    saved = {name: getattr(TaskIdentity, f"_{name}") for name in ("run_id", "node_id", "task_id")}
    for name, placeholder in (("run_id", 0), ("node_id", 0), ("task_id", 1)):
        if saved[name] is None:
            setattr(TaskIdentity, name, placeholder)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def _min_nodes(strategy: Strategy) -> int:
    """The most nodes a strategy (or one it wraps, via ``.strategy``) waits for in ``configure_train``."""
    need, s = 0, strategy
    while s is not None:
        need = max(need, getattr(s, "min_available_nodes", 0) or 0, getattr(s, "min_train_nodes", 0) or 0)
        s = getattr(s, "strategy", None)
    return need


def flower_aggregate(
    strategy: Strategy,
    global_state: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    client_ids: Sequence[int] | None = None,
    *,
    server_round: int = 1,
) -> tuple[StateDict | None, list[int] | None, float]:
    """Run ``strategy.aggregate_train`` on the replies the clients ``global + Δk`` would send.

    Args:
        strategy: any ``flwr.serverapp.strategy`` strategy (``Krum(num_malicious_nodes=1)``, ``FedMedian()``, ...).
        global_state: the round's global model.
        deltas: one update per client (float entries; missing keys = unchanged).
        num_examples: each client's weight.
        client_ids: node ids (default ``1..K``); the selection is reported with these ids.
        server_round: passed to ``configure_train`` and ``aggregate_train``.

    ``strategy.configure_train(server_round, global arrays, ConfigRecord(), grid of the round's clients)`` is called
    first, as Flower's ``Strategy.start`` does each round; the messages it builds are discarded (the replies come
    from ``deltas``), and Python's ``random`` state, which its node sampling draws from, is restored afterwards.

    Returns:
        ``(new global state or None when the strategy declined, e.g. Bulyan with too few replies; the selected
        client ids, or None when the strategy keeps everyone (median, trimmed mean); seconds)``.
    """
    ids = list(range(1, len(deltas) + 1)) if client_ids is None else list(client_ids)
    need = _min_nodes(strategy)
    if len(ids) < need:
        # Flower's node sampling would wait forever for the missing nodes
        raise ValueError(
            f"{type(strategy).__name__} waits for at least {need} nodes but the round has {len(ids)} "
            "clients; lower its min_available_nodes / min_train_nodes or pass more updates"
        )
    models = [candidate_state(global_state, d) for d in deltas]
    float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
    replies = build_replies(
        [{k: m[k] for k in float_keys} for m in models], num_examples, ids, server_round=server_round
    )
    arrays = ArrayRecord({k: global_state[k].detach().cpu() for k in float_keys})  # same keys and order as replies
    rng_state = random.getstate()
    try:
        with _task_identity():
            list(strategy.configure_train(server_round, arrays, ConfigRecord(), _RoundGrid(ids)))
    finally:
        random.setstate(rng_state)
    seen: list[list[RecordDict]] = []
    original = getattr(strategy, "train_metrics_aggr_fn", None)

    def record(contents: list[RecordDict], key: str) -> MetricRecord:
        seen.append(list(contents))
        return (original or aggregate_metricrecords)(contents, key)

    t0 = time.perf_counter()
    if original is not None:
        strategy.train_metrics_aggr_fn = record
    try:
        arrays, _ = strategy.aggregate_train(server_round, replies)
    finally:
        if original is not None:
            strategy.train_metrics_aggr_fn = original
    seconds = time.perf_counter() - t0
    if arrays is None:
        return None, None, seconds
    by_identity = {id(r.content): cid for r, cid in zip(replies, ids, strict=True)}
    selected = [by_identity[id(c)] for c in seen[-1]] if seen else None
    if selected is not None and len(selected) == len(ids):
        selected = None  # everyone kept: not a selection rule
    agg = arrays.to_torch_state_dict()
    new = {k: (agg[k].to(v.dtype) if k in agg else v.clone()) for k, v in global_state.items()}
    return new, selected, seconds


def flower_defence(strategy: Strategy):
    """A ``simulate.Defence`` that aggregates with a Flower strategy (falls back to keeping the global model).

    The same ``strategy`` instance serves every round (rounds numbered 1, 2, ...), so state it keeps across rounds
    (the adaptive DP wrapper's clipping norm, a privacy accountant) carries over as in a Flower run.
    """
    state = {"round": 0}

    def defence(model: torch.nn.Module, deltas, weights, ids) -> tuple[StateDict, list[int] | None, dict[str, Any]]:
        state["round"] += 1
        g = {k: v.detach().clone() for k, v in model.state_dict().items()}
        new, selected, seconds = flower_aggregate(strategy, g, deltas, weights, ids, server_round=state["round"])
        if new is None:
            return {k: torch.zeros_like(v) for k, v in g.items() if v.is_floating_point()}, [], {"declined": True}
        return {k: new[k] - g[k] for k in g if g[k].is_floating_point()}, selected, {"aggregate_seconds": seconds}

    return defence
