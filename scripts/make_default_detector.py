"""Write the embedded default detector into the package (src/metashield_hf/default_detector/).

Until meta-training produces `metashield-base`, the default is the detector's untrained prior (seeded), which scores
inputs by how far their ψ sit from the clean samples' ψ. Run: python scripts/make_default_detector.py [--from FOLDER]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metashield_hf import DEFAULT_DETECTOR_DIR, MetaShieldConfig, MetaShieldDetector
from metashield_hf.features import DEFAULT_GROUPS, feature_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--from", dest="source", help="copy a trained detector folder instead of the seeded prior")
    args = parser.parse_args()
    if args.source:
        det = MetaShieldDetector.from_pretrained(args.source)
    else:
        torch.manual_seed(0)
        det = MetaShieldDetector(MetaShieldConfig(feature_names=feature_names(), feature_groups=list(DEFAULT_GROUPS)))
    DEFAULT_DETECTOR_DIR.mkdir(exist_ok=True)
    det.save_pretrained(DEFAULT_DETECTOR_DIR)
    for code in DEFAULT_DETECTOR_DIR.glob("*.py"):  # the package has the code; no copies inside it
        code.unlink()
    size = sum(p.stat().st_size for p in Path(DEFAULT_DETECTOR_DIR).iterdir())
    print(f"wrote {DEFAULT_DETECTOR_DIR} ({size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
