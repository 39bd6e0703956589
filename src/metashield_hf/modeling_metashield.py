"""MetaShieldDetector: feature encoder → anomaly module → decision layer.

Imports ONLY torch, transformers and the sibling configuration file: ``trust_remote_code`` copies this file and its
single-dot relative imports, and requires every absolute import to be installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_metashield import MetaShieldConfig

# The textbook unsupervised anomaly scores among the ψ features: kNN distance (relative to the clean set's own), the
# shrinkage Mahalanobis distance (Lee et al. 2018) and the 0-dim persistence death time of the input's component.
PRIOR_FEATURES = ("distances.knn_ratio", "distances.maha_ratio", "topology.death_median")


@dataclass
class MetaShieldOutput(ModelOutput):
    """Output of [`MetaShieldDetector`].

    Args:
        loss: binary cross-entropy against ``labels`` (1 = triggered), when labels are given.
        logits: ``(B,)`` decision logits; ``scores = sigmoid(logits)`` is the probability that the input is triggered.
        scores: ``(B,)`` in ``[0, 1]``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class MetaShieldPreTrainedModel(PreTrainedModel):
    config_class = MetaShieldConfig
    base_model_prefix = "metashield"
    main_input_name = "features"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MetaShieldDetector):
            # The prior path makes an untrained detector a sensible anomaly scorer (mean clipped |z| of ψ against the
            # clean reference); meta-training then reweights features and learns the residual path.
            init.copy_(module.prior_gate, module.initial_prior_gate())
            init.constant_(module.prior_scale, 1.0)
            init.constant_(module.prior_bias, 1.0)
            # The residual path starts at exactly zero so that it cannot add noise before it is trained.
            init.zeros_(module.decision[-1].weight)
            init.zeros_(module.decision[-1].bias)


class MetaShieldDetector(MetaShieldPreTrainedModel):
    r"""The meta-learned backdoor detector.

    Reads ψ vectors of inputs to score and the ψ vectors of the clean reference set (computed leave-one-out), and
    returns one logit per input: higher means more likely triggered.

    * **encoder**: ψ is first standardised against the clean reference (per-feature mean/std, clipped), then encoded by
      an MLP; the clean reference goes through the same encoder.
    * **anomaly module**: the deviation of an input's encoding from the clean encodings (standardised), and a
      gated mean of the one-sided parts of z over ψ (the *prior*).
    * **decision layer**: ``logit = prior_scale * (prior - prior_bias) + MLP([|dev|, dev])``.

    Under 100K parameters at the default config.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf import MetaShieldConfig, MetaShieldDetector
        >>> det = MetaShieldDetector(MetaShieldConfig(feature_dim=12))
        >>> out = det(features=torch.randn(4, 12), reference_features=torch.randn(20, 12))
        >>> out.scores.shape
        torch.Size([4])
        ```
    """

    def __init__(self, config: MetaShieldConfig):
        super().__init__(config)
        f, h = config.feature_dim, config.hidden_dim
        self.encoder = nn.Sequential(
            nn.Linear(f, h), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(h, h), nn.LayerNorm(h)
        )
        self.prior_gate = nn.Parameter(torch.zeros(2, f))  # row 0: "above clean" is anomalous; row 1: "below clean"
        self.prior_scale = nn.Parameter(torch.ones(()))
        self.prior_bias = nn.Parameter(torch.ones(()))
        self.decision = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, 1))
        self.post_init()

    def initial_prior_gate(self) -> torch.Tensor:
        """Before meta-training, the prior trusts the reference-distance features (an input far from the clean set
        is suspicious: the classic unsupervised anomaly signal); every other gate starts near zero."""
        gate = torch.full((2, self.config.feature_dim), -6.0)
        for i, name in enumerate(self.config.feature_names or []):
            if name in PRIOR_FEATURES:
                gate[0, i] = 2.0
        if not self.config.feature_names:
            gate.zero_()
        return gate

    def standardize(self, features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
        """Per-feature z-scores of ``features`` against the reference set, clipped to ``±z_clip``."""
        mean = reference_features.mean(0)
        # The floor keeps z finite for a feature that is constant on the reference (legal: e.g. a saturated ratio),
        # and scales with |mean| so that features on large scales are not over-trusted on a tiny support.
        std = reference_features.std(0, unbiased=reference_features.shape[0] > 1)
        std = std.clamp_min(1e-2 + 0.05 * mean.abs())
        return ((features - mean) / std).clamp(-self.config.z_clip, self.config.z_clip)

    def forward(
        self,
        features: torch.Tensor,
        reference_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MetaShieldOutput:
        r"""
        Args:
            features: ``(B, F)`` ψ of the inputs to score.
            reference_features: ``(N, F)`` ψ of the clean reference set (leave-one-out), ``N >= 2``.
            labels: ``(B,)`` optional, 1 for triggered and 0 for clean; gives ``loss``.
        """
        if features.ndim != 2 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features must be (B, {self.config.feature_dim}), got {tuple(features.shape)}")
        if reference_features.ndim != 2 or reference_features.shape[0] < 2:
            raise ValueError(f"reference_features must be (N>=2, F), got {tuple(reference_features.shape)}")
        z = self.standardize(features, reference_features)
        z_ref = self.standardize(reference_features, reference_features)
        gate = nn.functional.softplus(self.prior_gate) + 1e-4
        prior = (z.clamp_min(0) * gate[0] + (-z).clamp_min(0) * gate[1]).sum(-1) / gate.sum()

        enc, enc_ref = self.encoder(z), self.encoder(z_ref)
        dev = (enc - enc_ref.mean(0)) / enc_ref.std(0, unbiased=True).clamp_min(1e-2)
        dev = dev.clamp(-self.config.z_clip, self.config.z_clip)
        residual = self.decision(torch.cat([dev.abs(), dev], dim=-1)).squeeze(-1)

        logits = self.prior_scale * (prior - self.prior_bias) + residual
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return MetaShieldOutput(loss=loss, logits=logits, scores=torch.sigmoid(logits))

    def adapt(self, target, clean_samples, **kwargs):
        """Adapt to ``target`` from clean samples; see `metashield_hf.shield.adapt` (needs the installed package)."""
        try:  # inside try: so that trust_remote_code loading does not require the package
            from metashield_hf.shield import adapt as _adapt
        except ImportError as err:
            raise ImportError("adapt() needs the metashield-hf package: pip install metashield-hf") from err
        return _adapt(self, target, clean_samples, **kwargs)


__all__ = ["MetaShieldOutput", "MetaShieldPreTrainedModel", "MetaShieldDetector"]
