"""Load a saved detector: the embedded ``metashield-base`` or any folder or Hub id saved with ``save_pretrained``.

Kept apart from ``hub.py`` (which registers the transformers pipeline) so that the jobs that only need a detector,
the scan and the federated screen, do not import the pipeline; it imports only the model.
"""

from __future__ import annotations

from pathlib import Path

from .modeling_metashield import MetaShieldDetector

DEFAULT_DETECTOR_DIR = Path(__file__).parent / "default_detector"
# The one-pass detector (ψ only: it reads activations alone, so the model-level scan and the federated screen, which
# score synthesized activations, use it); its own folder when the default detector reads live probes.
ONE_PASS_DETECTOR_DIR = (
    DEFAULT_DETECTOR_DIR / "one_pass" if (DEFAULT_DETECTOR_DIR / "one_pass").is_dir() else DEFAULT_DETECTOR_DIR
)


def load_detector(name_or_path: str | Path | None = None, *, one_pass: bool = False, **kwargs) -> MetaShieldDetector:
    """Load a detector (the embedded ``metashield-base`` when ``name_or_path`` is None).

    Args:
        name_or_path: a folder written by ``save_pretrained`` or a Hub id; ``None`` loads the one shipped in the
            package (``DEFAULT_DETECTOR_DIR``), which needs no network.
        one_pass: with ``name_or_path=None``, the embedded one-pass detector (``ONE_PASS_DETECTOR_DIR``: ψ only, no
            live probe), what jobs that score activations without the inputs behind them need.
        **kwargs: passed to ``MetaShieldDetector.from_pretrained`` (e.g. ``revision``).

    Returns:
        The [`MetaShieldDetector`].

    Example:
        ```python
        >>> from metashield_hf import load_detector
        >>> detector = load_detector()
        ```
    """
    default = ONE_PASS_DETECTOR_DIR if one_pass else DEFAULT_DETECTOR_DIR
    path = default if name_or_path is None else name_or_path
    if not (Path(path) / "config.json").exists() and Path(path).exists():
        raise ValueError(f"{path} is a folder but has no config.json: it is not a saved MetaShield detector")
    return MetaShieldDetector.from_pretrained(str(path), **kwargs)
