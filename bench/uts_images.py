"""How well UTS's visual scores tell drifted images from source ones on the embedded demo:
the area under the ROC curve (drifted vs source) of the per-token score and of the
image-level drift score (docs/formats/uplink.md, section 5).

    python bench/uts_images.py [--images 150] [--seed 100]

Runs the demo's student bundle as exported (the demo's model cache; trains the models on
a first run), calibrates on 60 source images as the demo does, and scores ``--images``
held-out images of each domain. Writes bench/results/uts_images.json and the
"uts-images" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, update_section, write_results  # noqa: E402


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a drifted image scores above a source one), ties counting half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=150, help="held-out images per domain")
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()

    from cdcca_edge.converters.export import export
    from cdcca_edge.core.calibration import VisualStats
    from cdcca_edge.demo.loop import TARGET_DOMAINS, models
    from cdcca_edge.demo.scenes import dataset
    from cdcca_edge.runtime.multimodal import MultimodalModel

    _teacher, student = models(False, lambda m: print(f"- {m}", file=sys.stderr))
    s = args.seed * 10_000
    with tempfile.TemporaryDirectory() as tmp:
        device = Path(tmp) / "device"
        export(student, device, "gguf", quant="q8_0", validate=False)
        with MultimodalModel(device, backend="llama") as mm:
            def tokens(examples):
                return [np.asarray(mm.encode_image(e.image)[0], np.float64) for e in examples]  # (T, D) each

            cal = tokens(dataset(60, seed=s + 103, domains=("source",)))
            test = {d: tokens(dataset(args.images, seed=s + 5000 + k, domains=(d,)))
                    for k, d in enumerate(("source", *TARGET_DOMAINS))}
    stats = VisualStats.fit(np.concatenate(cal))
    stats.fit_images(cal, np.zeros(len(cal)))
    scores = {
        "per-token (mean diagonal Mahalanobis)": lambda t: float(stats.ood_scores(t).mean()),
        "image-level drift (k-NN of the tokens' mean and std)": stats.image_drift,
    }
    rows, doc = [], {"machine": machine(), "seed": args.seed, "images_per_domain": args.images, "auroc": {}}
    for name, fn in scores.items():
        by = {d: np.array([fn(t) for t in ts]) for d, ts in test.items()}
        doc["auroc"][name] = {d: auroc(by[d], by["source"]) for d in TARGET_DOMAINS}
        rows.append(f"| {name} | " + " | ".join(f"{doc['auroc'][name][d]:.3f}" for d in TARGET_DOMAINS) + " |")
    path = write_results("uts_images", doc)
    md = f"""## UTS on images: telling a drifted camera from the source (`bench/uts_images.py`)

Area under the ROC curve, drifted vs source images, of UTS's two visual scores on the
demo's student as exported (tower tokens; calibrated on 60 source images; {args.images}
held-out images a domain; seed {args.seed}). 0.5 = chance, 1.0 = every drifted image
scores above every source one.

| score | {' | '.join(TARGET_DOMAINS)} |
|---|{'---:|' * len(TARGET_DOMAINS)}
{chr(10).join(rows)}
"""
    update_section("uts-images", md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
