"""Calibration files (`uplink calibrate` writes them; the device's UTS reads them, and
the cloud will ship them): the upload thresholds fitted on in-distribution inputs, and
the visual-token statistics of a multimodal model. Spec: docs/formats/uplink.md,
section 4.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.fileio import atomic_file, open_regular

CALIB_FORMAT = "cdcca-calibration"
CALIB_VERSION = 1
MAX_CALIB_BYTES = 64 << 20  # a few thousand visual dimensions fit many times over
# the sample scores a calibration may name (runtime/uts.py computes them, in this order)
SCORE_NAMES = ("mean_entropy", "max_entropy", "neg_log_confidence", "ref_confidence", "prompt_nll", "surprise")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
IMAGE_K = 5  # neighbours of an image's descriptor among the calibration images'
MAX_CALIB_IMAGES = 4096


@dataclass
class VisualStats:
    """Per-dimension mean and variance of in-distribution visual tokens (D,), (D,); and,
    when fitted per image, the calibration images' descriptors for an image-level drift
    score (:meth:`image_drift`)."""

    mean: list[float]
    var: list[float]
    keep: float = 0.5  # fraction of visual tokens uploaded (the paper's best mask ratio)
    images: list[list[float]] | None = None  # (N, 2D): each image's tokens' mean and std
    image_var: list[float] | None = None  # (2D,) their variance over the N images
    image_scale: float = 1.0  # median distance of a calibration image to its neighbours
    image_weight: float = 1.0  # text-score spread / drift-score spread, on calibration

    @classmethod
    def from_doc(cls, doc: Any, path: str | Path) -> "VisualStats":
        """From the calibration file's ``visual`` object, checked.

        Raises:
            FormatError: not D finite means and D positive finite variances, or a keep
                fraction outside (0, 1].
        """
        ok = isinstance(doc, dict) and isinstance(doc.get("mean"), list) and isinstance(doc.get("var"), list)
        if ok:
            mean, var, keep = doc["mean"], doc["var"], doc.get("keep", 0.5)
            ok = (0 < len(mean) == len(var) and all(_number(v) for v in mean)
                  and all(_number(v) and v > 0 for v in var) and _number(keep) and 0 < keep <= 1)
        if not ok:
            raise FormatError(f"{path}: field 'visual' must hold 'mean' and 'var' lists of equal, "
                              "non-zero length (finite numbers, variances > 0) and 'keep' in (0, 1]; "
                              "calibrate again with `cdcca-edge uplink calibrate`")
        out = cls([float(v) for v in mean], [float(v) for v in var], float(keep))
        if doc.get("images") is None:
            return out
        images, ivar = doc.get("images"), doc.get("image_var")
        scale, weight = doc.get("image_scale"), doc.get("image_weight")
        width = 2 * len(mean)
        ok = (isinstance(images, list) and 2 <= len(images) <= MAX_CALIB_IMAGES
              and all(isinstance(r, list) and len(r) == width and all(_number(v) for v in r) for r in images)
              and isinstance(ivar, list) and len(ivar) == width and all(_number(v) and v > 0 for v in ivar)
              and _number(scale) and scale > 0 and _number(weight) and weight >= 0)
        if not ok:
            raise FormatError(f"{path}: field 'visual' has 'images' but not 2 to {MAX_CALIB_IMAGES} "
                              f"descriptors of {width} finite numbers each, an 'image_var' of {width} "
                              "numbers > 0, an 'image_scale' > 0 and an 'image_weight' >= 0; calibrate "
                              "again with `cdcca-edge uplink calibrate`")
        out.images = [[float(v) for v in r] for r in images]
        out.image_var = [float(v) for v in ivar]
        out.image_scale, out.image_weight = float(scale), float(weight)
        return out

    @classmethod
    def fit(cls, tokens: np.ndarray, keep: float = 0.5, eps: float = 1e-6) -> "VisualStats":
        """From calibration tokens (N, D)."""
        x = np.asarray(tokens, dtype=np.float64).reshape(-1, np.shape(tokens)[-1])  # (N, D)
        return cls(x.mean(0).tolist(), (x.var(0) + eps).tolist(), keep)

    def fit_images(self, per_image: list[np.ndarray], text_scores: np.ndarray, eps: float = 1e-6) -> np.ndarray:
        """Fit the image-level drift score on the calibration images' tokens (each (T, D))
        and their text scores (N,); returns their drift scores (N,), each computed
        without the image itself among the neighbours.

        ``image_weight`` makes the two parts of a sample's score weigh alike: the spread of
        the text scores over the spread of the drift scores, on these in-distribution
        inputs (then text + weight * drift ranks as the sum of the two z-scores does)."""
        d = np.stack([descriptor(t) for t in per_image])  # (N, 2D)
        self.images = d.tolist()
        self.image_var = (d.var(0) + eps).tolist()
        raw = np.array([self._knn(d[i], exclude=i) for i in range(len(d))])
        self.image_scale = float(max(np.median(raw), 1e-12))
        drift = np.log(np.maximum(raw / self.image_scale, 1e-12))
        spread = float(drift.std())
        self.image_weight = float(np.std(text_scores)) / spread if spread > 0 else 1.0
        return drift

    def _knn(self, desc: np.ndarray, exclude: int | None = None) -> float:
        """Mean standardised distance of ``desc`` to its ``IMAGE_K`` nearest calibration
        descriptors (without descriptor ``exclude``)."""
        ref = np.asarray(self.images, dtype=np.float64)  # (N, 2D)
        dist = np.sqrt((((ref - desc) ** 2) / np.asarray(self.image_var)).sum(1))  # (N,)
        if exclude is not None:
            dist = np.delete(dist, exclude)
        k = min(IMAGE_K, len(dist))
        return float(np.sort(dist)[:k].mean())

    def image_drift(self, tokens: np.ndarray) -> float:
        """How far an image lies from the calibration images: ``ln`` of the mean distance
        of its descriptor (its tokens' per-dimension mean and std) to its ``IMAGE_K``
        nearest calibration descriptors, in units of their per-dimension spread, over the
        calibration images' own median (0: a typical in-distribution image). Pooled over
        the image, a camera's noise or texture moves every token alike, which a per-token
        distance drowns in the spread between patches (docs/formats/uplink.md, 5)."""
        return math.log(max(self._knn(descriptor(tokens)) / self.image_scale, 1e-12))

    def ood_scores(self, tokens: np.ndarray) -> np.ndarray:
        """Squared diagonal Mahalanobis distance of each token, per dimension. (T, D) -> (T,)

        A real out-of-distribution score: it grows with how far a token lies from what the
        vision tower produced on calibration images, in units of their spread. (MC dropout
        applied to the features themselves, as in the reference code, reduces to a token's
        mean squared activation and ignores the calibration data.)"""
        x = np.asarray(tokens, dtype=np.float64)
        mu, var = np.asarray(self.mean), np.asarray(self.var)
        return (((x - mu) ** 2) / var).mean(-1)

    def select(self, tokens: np.ndarray) -> np.ndarray:
        """Indices (ascending) of the ``keep`` fraction of tokens most out of distribution."""
        scores = self.ood_scores(tokens)
        k = max(1, int(round(len(scores) * self.keep)))
        return np.sort(np.argsort(-scores, kind="stable")[:k])


@dataclass
class Calibration:
    """Thresholds fitted on in-distribution inputs; travels with the artefact."""

    artifact_identity: str
    score: str
    rate: float  # fraction of in-distribution samples the threshold uploads
    threshold: float  # upload when uncertainty > threshold
    token_rate: float
    token_threshold: float  # flag answer tokens with entropy > this
    max_tokens: int
    n_samples: int
    n_tokens: int
    quantiles: dict[str, float] = field(default_factory=dict)
    visual: VisualStats | None = None

    def save(self, path: str | Path) -> None:
        """Write the calibration file (atomically, durably)."""
        doc = {"format": CALIB_FORMAT, "version": CALIB_VERSION, **asdict(self)}
        text = json.dumps(doc, indent=1)
        if self.visual is not None and self.visual.images is not None:
            # a number a line would triple the image descriptors' bytes (190 KB for 60 images)
            text = json.dumps(doc, separators=(",", ":"))
        with atomic_file(path, mode=0o644) as f:
            f.write((text + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read and check a calibration file (docs/formats/uplink.md, section 4).

        Raises:
            FormatError: not a calibration file of this version, or a field is missing,
                mistyped or out of range (named in the message).
        """
        with open_regular(path, "a calibration file") as f:
            raw = f.read(MAX_CALIB_BYTES + 1)
        if len(raw) > MAX_CALIB_BYTES:
            raise FormatError(f"{path}: larger than {MAX_CALIB_BYTES:,} bytes; not a calibration file")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except RecursionError as exc:
            raise FormatError(f"{path}: not valid JSON (nested too deeply)") from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != CALIB_FORMAT or doc.get("version") != CALIB_VERSION:
            raise FormatError(f"{path}: not a version-{CALIB_VERSION} calibration file; make one "
                              "with `cdcca-edge uplink calibrate`")
        return cls._from_doc(doc, path)

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], path: str | Path) -> "Calibration":
        def bad(key: str, want: str) -> FormatError:
            return FormatError(f"{path}: field {key!r} must be {want}, is {str(doc.get(key))[:80]!r}; "
                               "calibrate again with `cdcca-edge uplink calibrate`")

        ident = doc.get("artifact_identity")
        if not isinstance(ident, str) or not _HEX64.fullmatch(ident):
            raise bad("artifact_identity", "64 lowercase hex digits")
        if doc.get("score") not in SCORE_NAMES:
            raise bad("score", f"one of {', '.join(SCORE_NAMES)}")
        for key in ("rate", "token_rate"):
            if not _number(doc.get(key)) or not 0.0 < doc[key] < 1.0:
                raise bad(key, "a number in (0, 1)")
        for key in ("threshold", "token_threshold"):
            if not _number(doc.get(key)):
                raise bad(key, "a finite number")
        for key in ("max_tokens", "n_samples", "n_tokens"):
            if type(doc.get(key)) is not int or doc[key] < 0:
                raise bad(key, "an integer >= 0")
        quantiles = doc.get("quantiles", {})
        if not isinstance(quantiles, dict) or not all(_number(v) for v in quantiles.values()):
            raise bad("quantiles", "an object of finite numbers")
        return cls(
            artifact_identity=ident, score=doc["score"], rate=float(doc["rate"]),
            threshold=float(doc["threshold"]), token_rate=float(doc["token_rate"]),
            token_threshold=float(doc["token_threshold"]), max_tokens=doc["max_tokens"],
            n_samples=doc["n_samples"], n_tokens=doc["n_tokens"],
            quantiles={str(k): float(v) for k, v in quantiles.items()},
            visual=VisualStats.from_doc(doc["visual"], path) if doc.get("visual") is not None else None,
        )


def descriptor(tokens: np.ndarray) -> np.ndarray:
    """An image's descriptor: its visual tokens' per-dimension mean, then std. (T, D) -> (2D,)"""
    x = np.asarray(tokens, dtype=np.float64).reshape(-1, np.shape(tokens)[-1])
    return np.concatenate([x.mean(0), x.std(0)])


def _number(v: Any) -> bool:
    """A finite JSON number (a 400-digit integer is not one: it overflows a float)."""
    try:
        return type(v) in (int, float) and math.isfinite(v)
    except OverflowError:
        return False
