"""MetaShieldConfig: sizes of the detector and the layout of the feature vector ψ it reads.

Kept flat (imports only transformers) so that a Hub copy loads with ``trust_remote_code=True`` without the package.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MetaShieldConfig(PretrainedConfig):
    r"""Configuration of a [`MetaShieldDetector`].

    The detector reads ψ vectors (see `metashield_hf.features`); their layout is stored here so that a saved detector
    says which features, in which order, it expects.

    Args:
        feature_names (`list[str]`, *optional*):
            Names of the ψ features, in order (``"group.name"``). Defines ``feature_dim``.
        feature_dim (`int`, *optional*, defaults to 48):
            Length of ψ. Must equal ``len(feature_names)`` when both are given.
        feature_groups (`list[str]`, *optional*):
            The feature groups ψ was computed with (``metashield_hf.features.DEFAULT_GROUPS`` when omitted).
        hidden_dim (`int`, *optional*, defaults to 64):
            Width of the feature encoder and the decision layer.
        z_clip (`float`, *optional*, defaults to 8.0):
            Standardised deviations from the clean reference are clipped to ``[-z_clip, z_clip]`` so that one extreme
            feature cannot dominate the score.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout in the encoder (meta-training only).
        threshold (`float`, *optional*, defaults to 0.5):
            Score threshold used when no clean calibration set is available.
        adapt_steps (`int`, *optional*, defaults to 0):
            Inner-loop steps that adaptation runs when the caller does not say (meta-training records the number it
            was trained with, so a meta-learned detector adapts the way it learned to).
        adapt_lr (`float`, *optional*, defaults to 0.05):
            Inner-loop learning rate of that default adaptation.
        probes (`list[str]`, *optional*):
            The live probes (``metashield_hf.probes``) whose features follow ψ's, in order; ``None`` or ``[]``: the
            one-pass detector, which reads ψ only.
        probe_passes (`int`, *optional*, defaults to 16):
            The budget of extra forward passes per input the probes were trained with.

    Example:
        ```python
        >>> from metashield_hf import MetaShieldConfig, MetaShieldDetector
        >>> config = MetaShieldConfig(feature_dim=40)
        >>> detector = MetaShieldDetector(config)
        ```
    """

    model_type = "metashield"

    def __init__(
        self,
        feature_names: list[str] | None = None,
        feature_dim: int | None = None,
        feature_groups: list[str] | None = None,
        hidden_dim: int = 64,
        z_clip: float = 8.0,
        dropout: float = 0.0,
        threshold: float = 0.5,
        adapt_steps: int = 0,
        adapt_lr: float = 0.05,
        probes: list[str] | None = None,
        probe_passes: int = 16,
        **kwargs,
    ):
        if feature_names is not None:
            feature_names = list(feature_names)
            if feature_dim is not None and feature_dim != len(feature_names):
                raise ValueError(
                    f"feature_dim={feature_dim} disagrees with len(feature_names)={len(feature_names)}; "
                    "pass only feature_names"
                )
            feature_dim = len(feature_names)
        feature_dim = 48 if feature_dim is None else int(feature_dim)
        if feature_dim < 1 or hidden_dim < 1:
            raise ValueError(f"feature_dim and hidden_dim must be positive, got {feature_dim} and {hidden_dim}")
        if z_clip <= 0:
            raise ValueError(f"z_clip must be positive, got {z_clip}")
        self.feature_names = feature_names
        self.feature_dim = feature_dim
        self.feature_groups = list(feature_groups) if feature_groups is not None else None
        self.hidden_dim = int(hidden_dim)
        self.z_clip = float(z_clip)
        self.dropout = float(dropout)
        self.threshold = float(threshold)
        self.adapt_steps = int(adapt_steps)
        self.adapt_lr = float(adapt_lr)
        self.probes = list(probes) if probes else []
        self.probe_passes = int(probe_passes)
        kwargs.setdefault("id2label", {0: "clean", 1: "backdoored"})
        kwargs.setdefault("label2id", {"clean": 0, "backdoored": 1})  # not derived from id2label in v5
        super().__init__(**kwargs)
