"""Backdoor attacks for building the poisoned-model zoo: one registry, one frozen dataclass per attack.

Vision (``domain="cv"``): ``badnets``, ``blend``, ``trojan_watermark``, ``wanet``, ``sig``, ``filter``, ``bpp``,
``low_frequency``, ``ftrojan``, ``refool``, ``rotation``, ``poison_ink``, ``fiba``, and the adaptive
``latent_separability``, ``tact`` and ``adaptive_blend``.
Text (``domain="nlp"``): ``rare_word``, ``char_substitution``, ``syntactic_template``.
Federated (``domain="fl"``): ``fl_data_poisoning``, ``dba``, ``model_replacement``, ``model_replacement_constrained``,
``neurotoxin``, ``targeted_weight_modification``.

Example:
    ```python
    >>> from metashield_hf.attacks import ATTACKS, attack_from_dict
    >>> attack = ATTACKS.build("badnets", patch_size=4, seed=1)
    >>> attack_from_dict(attack.to_dict()) == attack
    True
    ```
"""

from __future__ import annotations

from .base import ATTACKS, POISONED_COLUMN, Attack, attack_from_dict
from .federated import (
    DBA,
    FederatedAttack,
    FLDataPoisoning,
    ModelReplacement,
    ModelReplacementConstrained,
    Neurotoxin,
    TargetedWeightModification,
)
from .text import CharSubstitution, RareWordInsertion, SyntacticTemplate
from .vision import (
    BPP,
    FIBA,
    NOISE_COLUMN,
    SIG,
    AdaptiveBlend,
    BadNets,
    Blend,
    Filter,
    FTrojan,
    LowFrequency,
    PoisonInk,
    Refool,
    Rotation,
    TrojanWatermark,
    WaNet,
)

__all__ = [
    "ATTACKS",
    "NOISE_COLUMN",
    "POISONED_COLUMN",
    "AdaptiveBlend",
    "Attack",
    "DBA",
    "BadNets",
    "FLDataPoisoning",
    "FederatedAttack",
    "ModelReplacement",
    "ModelReplacementConstrained",
    "Neurotoxin",
    "TargetedWeightModification",
    "Blend",
    "BPP",
    "FIBA",
    "Filter",
    "FTrojan",
    "LowFrequency",
    "PoisonInk",
    "Refool",
    "Rotation",
    "SIG",
    "CharSubstitution",
    "RareWordInsertion",
    "SyntacticTemplate",
    "TrojanWatermark",
    "WaNet",
    "attack_from_dict",
]
