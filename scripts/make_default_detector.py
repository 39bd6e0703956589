"""Write the embedded default detector into the package (src/metashield_hf/default_detector/).

The shipped default is `metashield-base`, meta-trained by `bash benchmarks/meta/run.sh`:
    python scripts/make_default_detector.py --from artifacts/meta/maml/detector
Without --from it writes the untrained prior (seeded), which scores inputs by how far their ψ sit from the clean
samples' ψ.
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
    parser.add_argument("--out", default=str(DEFAULT_DETECTOR_DIR), help="where to write (default: the package)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.source:
        det = MetaShieldDetector.from_pretrained(args.source)
        train_args = Path(args.source).parent / "train_args.json"
        if train_args.exists():  # a detector from `metashield train`: adapt as it was meta-trained
            import json

            ta = json.loads(train_args.read_text())
            det.config.adapt_steps = 0 if ta["algorithm"] == "pooled" else int(ta["inner_steps"])
            det.config.adapt_lr = float(ta["inner_lr"])
    else:
        torch.manual_seed(0)
        det = MetaShieldDetector(MetaShieldConfig(feature_names=feature_names(), feature_groups=list(DEFAULT_GROUPS)))
    out.mkdir(parents=True, exist_ok=True)
    det.save_pretrained(out)
    for code in out.glob("*.py"):  # the package has the code; no copies inside it
        code.unlink()
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
