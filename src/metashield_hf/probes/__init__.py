"""Live probes: evidence a detector reads from the live target beyond one pass through its penultimate layer.

| probe | paper | extra passes per input (default) |
|---|---|---|
| ``trajectory`` | TED, Mo et al. S&P 2024 | 0 (pooled block activations of the ordinary pass) |
| ``parameter_amplification`` | IBD-PSC, Hou et al. ICML 2024 | 5 |
| ``superimposition`` | STRIP, Gao et al. 2019 | 6 |
| ``input_amplification`` | SCALE-UP, Guo et al. ICLR 2023 (images, tensors) | 5 |

[`LiveEvidence`] runs a selection of them under a budget of extra forward passes (``probe_passes``, 16 by default) and
turns their statistics into fixed-length features.
"""

from __future__ import annotations

from . import inputs, parameters, trajectory  # noqa: F401  (register the probes)
from .base import PROBES, Probe, ProbeError, eval_mode, prediction_entropy
from .evidence import DEFAULT_PROBE_PASSES, DEFAULT_PROBES, LiveEvidence, standardise_against
from .inputs import InputAmplification, Superimposition
from .parameters import ParameterAmplification, amplifiable_layers, amplified
from .trajectory import Trajectory, layer_ranks

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_PROBE_PASSES",
    "PROBES",
    "InputAmplification",
    "LiveEvidence",
    "ParameterAmplification",
    "Probe",
    "ProbeError",
    "Superimposition",
    "Trajectory",
    "amplifiable_layers",
    "amplified",
    "eval_mode",
    "layer_ranks",
    "prediction_entropy",
    "standardise_against",
]
