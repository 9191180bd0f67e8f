"""The drift alarm: a reference profile stored with each model version, and a check of every batch
against it. Pure numpy (plus onnxruntime to run the model on the validation split), no torch.

What is profiled, and why these statistics:

- Three per-record features, robust to faithful re-encodings of a digit (PNG, JPEG, RGB, a resize)
  and cheap enough for every record of every batch (two integer reductions over the pixels; the
  job's throughput target leaves ~0.3 ms per 1,024 images): `intensity` (mean pixel value), `border`
  (share of the intensity in the outer 4-pixel frame: MNIST digits sit in the central 20x20 box,
  clothing and noise fill the frame) and `confidence` (the model's top probability, which the job
  computes anyway). Each is quantised to one of BINS levels, so a record's score is three table
  look-ups. The pixel features come from the training split, the confidence from the first half of
  the validation split (held out: the model is more confident on what it was trained on).
- A per-record `ood_score`: how far into the reference's tails the record's most unusual feature lies,
  `max_f -log10(min(1, F * p_f))` where `p_f` is the two-sided empirical tail probability of feature
  `f` (a rank statistic: no Gaussian assumption, ties and the many all-black borders handled), with
  a Bonferroni factor for the F features; values beyond everything seen in the reference add their
  distance in units of the feature's reference spread, so extreme records still rank. ~0 for typical
  digits, >= ~2 for records unlike any in the training data.
- Batch test 1, the tail fraction: the threshold `t` is the 99th percentile of the score on the
  second half of the validation split (held out from both the features' and the confidence's
  reference), so a record like the training data exceeds `t` with probability ~1%. The batch alarms
  when its number of exceedances k of n is improbable under a tolerated rate p0 = 3% (three times the
  reference rate: room for benign shifts such as JPEG artefacts or another scanner): the one-sided
  binomial tail P(Binomial(n, p0) >= k) < alpha = 0.001. The false-alarm rate is therefore at most
  0.1% for any batch whose records exceed t at a rate <= 3% (the training data: 1%), whatever n.
  Unlike a KS test per feature, its power grows with n only against shifts larger than the tolerance,
  so a faithful 10,000-image batch does not alarm on trivial differences.
- Batch test 2, the predicted classes: a chi-square test of the predicted-class counts against the
  reference frequencies (validation split), alarming when its p-value < alpha = 0.001 *and* the total
  variation distance exceeds 0.2 (an effect size that matters; a huge batch then does not alarm on a
  statistically significant but tiny shift). Only for n >= 50 (the chi-square approximation needs
  expected counts of a few per class). A model that puts a noise batch into one class trips it.
The overall false-alarm rate under the reference distribution is at most the sum of the two alphas
(0.2%); `bench/bench_drift.py` measures it on random 1,000-image batches of the MNIST test set.

A version trained on feedback sets (serving/feedback.py) was trained on more than one distribution,
and a batch drawn from one of them is not a drift. Quantiles of the pooled training images cannot say
so: a set of 2,400 inverted digits is the top 5% of the pooled intensity, so a batch of inverted
digits sits in the pooled tail and alarms (measured: 43% above t with a 1,600-record set, 22% with
4,000). So the profile keeps one component per feedback set beside the pooled one: the pixel
quantiles of the set's training part and the confidence quantiles of its held-out part (held out from
training, like validation half A), its scores scaled so that their 99th percentile on the other
half of the held-out part lands on t (like validation half B), and a record's score is its lowest
over the components: a record is unusual only if it is unlike every distribution the version was
trained on. Without the scale, the pooled t let 6.3% of a fresh inverted batch exceed it (a
4,000-record set, tests/test_loop.py): the set's score tails are not the training split's. A set's
calibration rests on half its held-out part (400 records of a 4,000-record set): a set of a few
thousand records covers its distribution; one of a few hundred may not. A component is the set's own
population, not its whole domain: with a set of inverted digits drawn at random from MNIST's test
split, 1.4-1.6% of a fresh batch drawn the same way exceeded t; with a set drawn mostly (3,000 of
4,000) from the split's first group of writers (its first 5,000 records: another source than the
last 5,000), 3.9-4.7% of a batch of the second group did (an alert at 2,000 records).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ModelSourceError

PROFILE_VERSION = 1
FEATURES = ("intensity", "border", "confidence")
BINS = 1024  # quantisation levels of each feature
QUANTILES = 1001  # reference quantiles per feature: tail probabilities resolved down to ~0.1%
EXCEED_QUANTILE = 0.99  # t: the 99th percentile of the held-out score
TOLERANCE = 0.03  # p0: the exceedance rate tolerated before the tail test alarms
ALPHA = 0.001  # false-alarm rate of each test under its null hypothesis
CLASS_TV_MIN = 0.2  # effect size of the class test
CLASS_MIN_RECORDS = 50
ARTIFACT_PATH = "drift"  # on the version's run: drift/reference.json
ARTIFACT_NAME = "reference.json"
VERSION_TAG = "drift.reference"


# --- features ------------------------------------------------------------------------------------


def pixel_bins(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intensity bin, border bin), each (B,) int64 in 0..BINS-1, of uint8 pixels (B, 28, 28)."""
    # uint32 accumulators: half the CPU time of int64 ones (<= 199,920 fits), the dominant cost here
    total = pixels.reshape(len(pixels), 784).sum(axis=1, dtype=np.uint32)  # (B,)
    centre = pixels.reshape(len(pixels), 28, 28)[:, 4:24, 4:24].sum(axis=(1, 2), dtype=np.uint32)
    return sum_bins(np.stack([total, centre], axis=1))


def sum_bins(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pixel_bins of the images' pixel sums (B, 2): each one's total and its central 20x20 box's (the
    model's `pixel_sums` output, or the sums above); integers, in any number type."""
    total, centre = sums[:, 0].astype(np.int64), sums[:, 1].astype(np.int64)
    intensity = total * (BINS - 1) // (784 * 255)
    border = (total - centre) * (BINS - 1) // np.maximum(total, 1)
    return intensity, border


def confidence_bins(probability: np.ndarray) -> np.ndarray:
    """(B,) int64 in 0..BINS-1 of the top probabilities (B,)."""
    return np.minimum((probability * (BINS - 1)).astype(np.int64), BINS - 1)


def features(pixels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(B, 3) int64 feature bins of uint8 pixels (B, 28, 28) and probabilities (B, 10)."""
    intensity, border = pixel_bins(pixels)
    return np.stack([intensity, border, confidence_bins(probs.max(axis=1))], axis=1)


# --- the reference profile -------------------------------------------------------------------------


@dataclass
class Reference:
    quantiles: list[list[float]]  # per feature, QUANTILES values at levels 0, 1/(Q-1), .., 1
    threshold: float  # t: EXCEED_QUANTILE of the held-out score
    exceed_rate: float  # the held-out fraction above t (<= 1 - EXCEED_QUANTILE, ties)
    class_freq: list[float]  # predicted-class frequencies on the validation split
    medians: dict[str, float]  # reference medians of each feature (for the report)
    sizes: dict[str, int]  # records behind each part
    # One per feedback set trained on: {"name", "quantiles" (F x QUANTILES), "scale" (of its scores), "sizes"};
    # absent in profiles
    # of versions trained without feedback (and in those stored before components existed).
    components: list[dict[str, Any]] = field(default_factory=list)
    version: int = PROFILE_VERSION
    features: tuple[str, ...] = FEATURES
    tolerance: float = TOLERANCE
    alpha: float = ALPHA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "reference") -> "Reference":
        if d.get("version") != PROFILE_VERSION or list(d.get("features", [])) != list(FEATURES):
            raise ModelSourceError(f"{source}: not a drift reference of version {PROFILE_VERSION}")
        return cls(**{**d, "features": tuple(d["features"])})


def _term(q: np.ndarray, spread: float, v: np.ndarray, n_feat: int) -> np.ndarray:
    """One feature's score term of values v against its reference quantiles q (Q,)."""
    n_q = len(q)
    below = np.searchsorted(q, v, side="left")  # reference quantiles < v
    upto = np.searchsorted(q, v, side="right")  # <= v
    p = 2.0 * np.minimum((upto + 1) / (n_q + 1), (n_q - below + 1) / (n_q + 1))
    excess = np.maximum(np.maximum(q[0] - v, v - q[-1]), 0.0) / spread
    return -np.log10(np.minimum(1.0, n_feat * p)) + excess


def score_tables(ref_q: np.ndarray) -> np.ndarray:
    """(F, BINS) float32: the score term of every bin of every feature; a record's ood score is
    max_f table[f, bin_f] (three look-ups per record instead of searches)."""
    spread = _spread(ref_q)
    grid = np.arange(BINS, dtype=np.float64)
    return np.stack([_term(ref_q[f], spread[f], grid, len(ref_q)) for f in range(len(ref_q))]).astype(np.float32)


def scores(tables: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """(B,) float32 ood scores of feature bins (B, F)."""
    out = tables[0][feats[:, 0]]
    for f in range(1, tables.shape[0]):
        np.maximum(out, tables[f][feats[:, f]], out=out)
    return out


def component_tables(ref: "Reference") -> list[np.ndarray]:
    """The score tables of the pooled profile and of each component: a record's ood score is its
    lowest score over them."""
    return [score_tables(np.asarray(ref.quantiles, dtype=np.float64)),
            *(score_tables(np.asarray(c["quantiles"], dtype=np.float64)) * np.float32(c["scale"])
              for c in ref.components)]


def lowest_scores(tables: list[np.ndarray], feats: np.ndarray) -> np.ndarray:
    """(B,) float32 ood scores of feature bins (B, F): the lowest over the components' tables."""
    out = scores(tables[0], feats)
    for t in tables[1:]:
        np.minimum(out, scores(t, feats), out=out)
    return out


def _predict(model_path: Path, images: np.ndarray, batch: int = 4096) -> np.ndarray:
    from serving.session import INPUT_NAME, OUTPUT_NAME, create_session

    session = create_session(Path(model_path), "cpu")
    return np.concatenate([
        session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[s : s + batch])})[0]
        for s in range(0, len(images), batch)
    ])


def _quantiles(pixels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """(F, QUANTILES): the pixel features' quantiles of `pixels` (N, 28, 28), the confidence bins'
    of `confidence` (M,)."""
    levels = np.linspace(0.0, 1.0, QUANTILES)
    pixel_feats = np.stack(pixel_bins(pixels), axis=1)  # (N, 2)
    return np.vstack([np.quantile(pixel_feats, levels, axis=0).T, np.quantile(confidence, levels)[None, :]])


def compute_reference(model_path: Path, train_images: np.ndarray, val_images: np.ndarray,
                      components: tuple[tuple[str, np.ndarray, np.ndarray], ...] = ()) -> Reference:
    """The profile of a model: pixel features of everything it trained on, its behaviour on the
    validation split (half A: confidence and classes; half B: the calibration of the score
    threshold), and one component per feedback set it trained on: (name, the set's training part,
    its held-out part)."""
    train_feats = np.stack(pixel_bins(train_images), axis=1)  # (N, 2)
    half = len(val_images) // 2
    probs = _predict(model_path, val_images)
    val_feats = features(val_images, probs)
    a, b = val_feats[:half], val_feats[half:]
    q = _quantiles(train_images, a[:, 2])
    base = score_tables(q)
    t_base = float(np.quantile(scores(base, b), EXCEED_QUANTILE))
    parts = []
    for name, trained, held_out in components:
        # Like the validation split's halves: the model's confidence on the first half of the held-out
        # part (the model is more confident on what it trained on), the set's own 99th percentile of
        # the score on the second; its scores are scaled so that this percentile lands on the pooled
        # t (the score's tails are the set's own: a narrow feature, such as the all-white frame of an
        # inverted digit, ties and tails unlike the training split's).
        half_c = len(held_out) // 2
        conf_part, calib_part = (held_out[:half_c], held_out[half_c:]) if half_c else (trained, trained)
        qc = _quantiles(trained, confidence_bins(_predict(model_path, conf_part).max(axis=1)))
        calib = scores(score_tables(qc), features(calib_part, _predict(model_path, calib_part)))
        t_c = float(np.quantile(calib, EXCEED_QUANTILE))
        parts.append({"name": name, "quantiles": qc.tolist(), "scale": t_base / max(t_c, 1e-6),
                      "sizes": {"train": len(trained), "holdout": len(held_out)}})
    tables = [base, *(score_tables(np.asarray(c["quantiles"])) * np.float32(c["scale"]) for c in parts)]
    s = lowest_scores(tables, b)
    t = float(np.quantile(s, EXCEED_QUANTILE))
    counts = np.bincount(probs[:half].argmax(axis=1), minlength=10)
    medians = {name: float(np.median(train_feats[:, i])) / (BINS - 1) for i, name in enumerate(FEATURES[:2])}
    medians["confidence"] = float(np.median(a[:, 2])) / (BINS - 1)
    return Reference(
        quantiles=q.tolist(), threshold=t, exceed_rate=float(np.mean(s > t)),
        class_freq=(counts / counts.sum()).tolist(), medians=medians,
        sizes={"train": len(train_images), "validation_a": half, "validation_b": len(b)}, components=parts,
    )


def _spread(q: np.ndarray) -> np.ndarray:
    """Each feature's reference spread (1st to 99th percentile, at least one bin)."""
    n = q.shape[1] - 1
    return np.maximum(q[:, int(0.99 * n)] - q[:, int(0.01 * n)], 1.0)


# --- the statistical tests -------------------------------------------------------------------------


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), exactly (log-space terms; n up to millions). Summed from k away from
    the mean n p, where the terms shrink geometrically: upwards for a k above it, else the lower tail
    P(X < k) downwards from k - 1 (sf = 1 - that). A few thousand terms at most whatever n: summing
    upwards from a k far below the mean took ~n p terms (~10 ms for a batch of 1.2 M records)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logp, log1p, lgn = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def pmf(i: int) -> float:
        return math.exp(lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * logp + (n - i) * log1p)

    upper = k > n * p
    total = 0.0
    for i in (range(k, n + 1) if upper else range(k - 1, -1, -1)):
        term = pmf(i)
        total += term
        if (term == 0.0 or term < total * 1e-17) and (i > n * p if upper else i < n * p):
            break  # the terms further out are smaller still (0.0: below the float range)
    return min(1.0, total) if upper else max(0.0, 1.0 - total)


def chi2_sf_9(x: float) -> float:
    """P(chi-square with 9 degrees of freedom >= x): Q(9/2, x/2), in closed form for a half-integer."""
    if x <= 0:
        return 1.0
    h = x / 2.0
    total = math.erfc(math.sqrt(h))
    term = math.sqrt(h) * math.exp(-h) / math.gamma(1.5)
    for k in range(4):  # Q(a + 1, h) = Q(a, h) + h^a e^-h / Gamma(a + 1), a = 1/2 .. 7/2
        total += term
        term *= h / (k + 1.5)
    return min(1.0, max(0.0, total))


# --- the check of one batch ------------------------------------------------------------------------


@dataclass
class DriftReport:
    status: str  # ok | alert | unavailable
    reason: str
    records: int = 0
    statistics: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    reference: str | None = None  # where the profile came from

    @property
    def alert(self) -> bool:
        return self.status == "alert"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics, grouped under drift/ in the UI: the statistics, the alert (0/1) and the
        thresholds they were compared with."""
        out = {f"drift/{k}": v for k, v in {**self.statistics, "alert": float(self.alert)}.items()}
        out.update({f"drift/thresholds/{k}": v for k, v in self.thresholds.items()})
        return out


def unavailable(reason: str) -> DriftReport:
    return DriftReport(status="unavailable", reason=reason)


class DriftMonitor:
    """Fed chunk by chunk by the job; `report()` runs the tests over the whole batch."""

    def __init__(self, ref: Reference, source: str):
        self.ref, self.source = ref, source
        self._tables = component_tables(ref)
        self._threshold = np.float32(ref.threshold)
        self.n = 0
        self.exceed = 0
        self.classes = np.zeros(10, dtype=np.int64)
        self.hist = {name: np.zeros(BINS, dtype=np.int64) for name in ("intensity", "confidence")}

    def scores(self, pixels: np.ndarray, probability: np.ndarray,
               sums: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ood scores, intensity bins, confidence bins), each (B,), of one chunk: pixels (B, 28, 28)
        and top probabilities (B,); `sums`, the model's pixel_sums output (B, 2) when it has one,
        spares the pass over the pixels. Thread-safe (reads only), so the job runs it beside inference."""
        intensity, border = pixel_bins(pixels) if sums is None else sum_bins(sums)
        confidence = confidence_bins(probability)
        s = None
        for tables in self._tables:  # the lowest over the components (one, without feedback)
            c = tables[0][intensity]
            np.maximum(c, tables[1][border], out=c)
            np.maximum(c, tables[2][confidence], out=c)
            s = c if s is None else np.minimum(s, c, out=s)
        return s, intensity, confidence

    def count(self, scored: tuple[np.ndarray, np.ndarray, np.ndarray], prediction: np.ndarray) -> None:
        """Add one chunk's scores (from `scores`) and predicted classes to the batch's statistics."""
        s, intensity, confidence = scored
        self.n += len(s)
        self.exceed += int(np.count_nonzero(s > self._threshold))
        self.classes += np.bincount(prediction, minlength=10)
        self.hist["intensity"] += np.bincount(intensity, minlength=BINS)
        self.hist["confidence"] += np.bincount(confidence, minlength=BINS)

    def update(self, pixels: np.ndarray, probability: np.ndarray, prediction: np.ndarray) -> np.ndarray:
        """`scores` then `count`: the ood scores (B,) of one chunk, counted into the statistics."""
        scored = self.scores(pixels, probability)
        self.count(scored, prediction)
        return scored[0]

    def _median(self, name: str) -> float:
        c = np.cumsum(self.hist[name])
        return float(np.searchsorted(c, c[-1] / 2.0) / (BINS - 1))

    def report(self) -> DriftReport:
        r, n = self.ref, self.n
        if n == 0:
            return unavailable("no records were scored")
        tail_p = binomial_sf(self.exceed, n, r.tolerance)
        freq = np.asarray(r.class_freq)
        expected = np.maximum(freq * n, 1e-9)
        chi2 = float(((self.classes - expected) ** 2 / expected).sum())
        class_p = chi2_sf_9(chi2)
        tv = float(0.5 * np.abs(self.classes / n - freq).sum())
        tail_alarm = tail_p < r.alpha
        class_alarm = n >= CLASS_MIN_RECORDS and class_p < r.alpha and tv > CLASS_TV_MIN
        reasons = []
        if tail_alarm:
            reasons.append(f"{self.exceed} of {n} records ({self.exceed / n:.1%}) score above the "
                           f"reference's 99th percentile (tolerated: {r.tolerance:.0%}; p = {tail_p:.2g})")
        if class_alarm:
            reasons.append(f"predicted classes differ from the reference by {tv:.2f} (total variation; "
                           f"chi-square p = {class_p:.2g})")
        stats = {
            "records": float(n),
            "exceed_fraction": self.exceed / n,
            "exceed_p_value": tail_p,
            "class_tv": tv,
            "class_p_value": class_p,
            "median_intensity": self._median("intensity"),
            "median_confidence": self._median("confidence"),
        }
        thresholds = {
            "score_threshold": r.threshold,
            "reference_exceed_rate": r.exceed_rate,
            "tolerated_exceed_fraction": r.tolerance,
            "alpha": r.alpha,
            "class_tv_min": CLASS_TV_MIN,
            "class_min_records": float(CLASS_MIN_RECORDS),
            "reference_median_intensity": r.medians["intensity"],
            "reference_median_confidence": r.medians["confidence"],
        }
        alert = tail_alarm or class_alarm
        reason = "; ".join(reasons) if alert else (
            f"{self.exceed / n:.1%} of records above the reference's 99th percentile (tolerated "
            f"{r.tolerance:.0%}), predicted classes within {tv:.2f} of the reference")
        return DriftReport("alert" if alert else "ok", reason, n, stats, thresholds, self.source)


# --- storage with the model version ---------------------------------------------------------------


def store_reference(model_name: str, version: str, run_id: str, model_path: Path,
                    train_images: np.ndarray, val_images: np.ndarray,
                    components: tuple[tuple[str, np.ndarray, np.ndarray], ...] = ()) -> str:
    """Compute the profile of a registered version (`compute_reference`) and store it with it: an
    artifact `drift/reference.json` on the version's run and the version tag `drift.reference`
    pointing at it. Returns that artifact URI."""
    from common.settings import mlflow_client

    ref = compute_reference(model_path, np.asarray(train_images), np.asarray(val_images), components)
    client = mlflow_client()
    with tempfile.TemporaryDirectory(prefix="mnistops-drift-") as tmp:
        path = Path(tmp) / ARTIFACT_NAME
        path.write_text(json.dumps(ref.to_dict()))
        client.log_artifact(run_id, str(path), ARTIFACT_PATH)
    uri = f"runs:/{run_id}/{ARTIFACT_PATH}/{ARTIFACT_NAME}"
    client.set_model_version_tag(model_name, str(version), VERSION_TAG, uri)
    return uri


def load_reference(source: str | os.PathLike) -> Reference:
    """A profile from a local JSON file or an MLflow artifact URI (runs:/..., models:/...)."""
    text = str(source)
    try:
        if "://" in text or text.startswith(("runs:/", "models:/")):
            import mlflow.artifacts
            from mlflow.exceptions import MlflowException

            try:
                with tempfile.TemporaryDirectory(prefix="mnistops-drift-") as tmp:
                    local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=tmp)
                    d = json.loads(Path(local).read_text())
            except MlflowException as e:
                raise ModelSourceError(f"{text}: cannot download the drift reference ({e.message})") from e
        else:
            d = json.loads(Path(text).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{text}: not a readable drift reference ({e})") from e
    return Reference.from_dict(d, text)
