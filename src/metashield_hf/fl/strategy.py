"""``MetaShieldStrategy``: a Flower strategy wrapper that screens client updates before aggregation.

Requires ``flwr`` (``pip install "metashield-hf[fl]"``); Flower's Message API (``flwr.serverapp.strategy``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "MetaShieldStrategy needs Flower: pip install 'metashield-hf[fl]' (or pip install 'flwr>=1.42')"
    ) from err

from .calibration import ScreenCalibration
from .screen import ClientScore, score_client_updates

logger = logging.getLogger(__name__)

Screen = Callable[..., list[ClientScore]]


class MetaShieldStrategy(Strategy):
    """Wrap any Flower strategy: score each round's client updates, drop or down-weight the flagged ones, aggregate
    the rest with the wrapped strategy.

    In ``aggregate_train`` the replies' models are turned into updates against the global model the round was
    configured with (remembered in ``configure_train``), scored by [`score_client_updates`] (the model-level scan
    of each candidate ``global + Δk`` on the server's clean samples; no client data, no triggered input), and then:

    - ``action="drop"``: flagged replies are removed (if every reply is flagged, nothing is aggregated this round);
    - ``action="downweight"``: their ``weighted_by_key`` metric (``num-examples``) is multiplied by ``downweight``.

    The round's aggregated ``MetricRecord`` gains ``metashield-score-<node>``, ``metashield-flagged-<node>`` per
    reply and ``metashield-num-flagged``, ``metashield-seconds``; the full [`ClientScore`] lists are kept in
    ``self.history[round]``.

    With a ``calibration`` ([`ScreenCalibration`]) the screen is the calibrated one: the server rounds up to
    ``calibration_rounds`` are trusted (every reply is aggregated and its evidence is added to the calibration's
    benign history, ``metashield-calibrating`` = 1), and later rounds are scored against that history and flagged
    at the calibration's target false-positive rate. A calibration filled beforehand (e.g. loaded with
    [`ScreenCalibration.load`]) screens from the first round with ``calibration_rounds=0``. While it is not yet
    ready (too little history) a round is screened by the relative screen instead.

    Args:
        strategy: the Flower strategy that aggregates (FedAvg, FedProx, Krum, ...); every other method is its own.
        clean_samples: the server's few clean inputs, in the model's input format (e.g. an ``(N, C, H, W)`` tensor).
        model_fn: builds an ``nn.Module`` of the trained architecture (its weights are replaced by the global model).
        detector: the input-level detector for the scan (``None``: the embedded default).
        action: ``"drop"`` or ``"downweight"``.
        downweight: weight factor for flagged clients with ``action="downweight"``.
        arrayrecord_key: the reply key holding the client model (Flower's default ``"arrays"``).
        weighted_by_key: the reply metric used as the aggregation weight (Flower's default ``"num-examples"``).
        screen: replaces [`score_client_updates`] (same signature); for tests and custom screens.
        calibration: the calibrated screen's benign history (filled in place on the trusted rounds).
        calibration_rounds: server rounds ``1..calibration_rounds`` are trusted and only calibrate.
        **screen_options: passed to the screen (``steps``, ``z_threshold``, ``seed``, ...).

    Example:
        ```python
        >>> from flwr.serverapp.strategy import FedAvg
        >>> strategy = MetaShieldStrategy(FedAvg(fraction_train=0.5), clean_images[:10], model_fn=Net)
        >>> result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=5)
        >>> strategy.history[3]   # [ClientScore(client=<node id>, score=..., flagged=...), ...]
        ```
    """

    def __init__(
        self,
        strategy: Strategy,
        clean_samples: Any,
        model_fn: Callable[[], nn.Module],
        *,
        detector: Any = None,
        action: str = "drop",
        downweight: float = 0.1,
        arrayrecord_key: str = "arrays",
        weighted_by_key: str = "num-examples",
        screen: Screen | None = None,
        calibration: ScreenCalibration | None = None,
        calibration_rounds: int = 0,
        **screen_options: Any,
    ) -> None:
        if action not in ("drop", "downweight"):
            raise ValueError(f"action must be 'drop' or 'downweight', got {action!r}")
        if not 0.0 <= downweight <= 1.0:
            raise ValueError(f"downweight must be in [0, 1], got {downweight}")
        self.strategy = strategy
        self.clean_samples = clean_samples
        self.model_fn = model_fn
        self.detector = detector
        self.action = action
        self.downweight = downweight
        self.arrayrecord_key = arrayrecord_key
        self.weighted_by_key = weighted_by_key
        self.screen = screen or score_client_updates
        self.screen_options = screen_options
        if calibration_rounds < 0:
            raise ValueError(f"calibration_rounds must be >= 0, got {calibration_rounds}")
        if calibration_rounds and calibration is None:
            raise ValueError("calibration_rounds needs a calibration (e.g. ScreenCalibration()) to fill")
        self.calibration = calibration
        self.calibration_rounds = calibration_rounds
        self.history: dict[int, list[ClientScore]] = {}
        self._global: ArrayRecord | None = None

    # ---- delegated ------------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays  # the model every reply of this round started from
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        logger.info("MetaShieldStrategy (action=%s) wrapping %s", self.action, type(self.strategy).__name__)
        self.strategy.summary()

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Set the round's global model by hand (when ``aggregate_train`` is called without ``configure_train``)."""
        self._global = arrays

    # ---- screening ------------------------------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, drop or down-weight the flagged ones, and aggregate the rest with the wrapped strategy."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error() and self.arrayrecord_key in m.content.array_records]
        if self._global is None:
            raise RuntimeError(
                "MetaShieldStrategy does not know the round's global model: it is remembered in configure_train; "
                "call set_global_arrays(arrays) first when calling aggregate_train directly"
            )
        if len(valid) == 0:
            return self.strategy.aggregate_train(server_round, replies)
        model = self.model_fn()
        model.load_state_dict(self._global.to_torch_state_dict(), strict=False)
        model.eval()
        clients = [m.metadata.src_node_id for m in valid]
        updates = [m.content[self.arrayrecord_key].to_torch_state_dict() for m in valid]
        if self.calibration is not None and server_round <= self.calibration_rounds:  # a trusted round
            self.calibration.calibrate(
                model, updates, self.clean_samples, round_id=server_round, client_ids=clients, as_deltas=False
            )
            logger.info("round %d: trusted, %d replies added to the calibration", server_round, len(valid))
            arrays, metrics = self.strategy.aggregate_train(server_round, valid)
            metrics = MetricRecord() if metrics is None else metrics
            metrics["metashield-calibrating"] = 1
            return arrays, metrics
        calibrated = self.calibration is not None and self.calibration.ready
        if self.calibration is not None and not calibrated:
            logger.warning("round %d: the calibration is not ready; the relative screen decides", server_round)
        scores = self.screen(
            model, updates, self.clean_samples, self.detector, client_ids=clients, as_deltas=False,
            **({"calibration": self.calibration} if calibrated else {}), **self.screen_options,
        )  # fmt: skip
        self.history[server_round] = scores
        flagged = {s.client for s in scores if s.flagged}
        logger.info("round %d: MetaShield flagged %s of %d replies", server_round, sorted(flagged), len(valid))
        if self.action == "drop":
            kept = [m for m in valid if m.metadata.src_node_id not in flagged]
        else:
            kept = [self._reweighted(m) if m.metadata.src_node_id in flagged else m for m in valid]
            if self.downweight == 0.0:
                kept = [m for m in valid if m.metadata.src_node_id not in flagged]
        arrays, metrics = (None, None) if not kept else self.strategy.aggregate_train(server_round, kept)
        metrics = MetricRecord() if metrics is None else metrics
        for s in scores:
            metrics[f"metashield-score-{s.client}"] = float(s.score)
            metrics[f"metashield-flagged-{s.client}"] = int(s.flagged)
        metrics["metashield-num-flagged"] = len(flagged)
        metrics["metashield-seconds"] = float(sum(s.seconds for s in scores))
        return arrays, metrics

    def _reweighted(self, msg: Message) -> Message:
        content = RecordDict()
        for key, record in msg.content.items():
            if isinstance(record, MetricRecord) and self.weighted_by_key in record:
                record = MetricRecord(dict(record))
                record[self.weighted_by_key] = record[self.weighted_by_key] * self.downweight
            content[key] = record
        return Message(metadata=msg.metadata, content=content)
