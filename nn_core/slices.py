"""The gate's rule per slice, pure numpy: the candidate against the champion on each named slice (the
task's validation split, the held-out part of each feedback set).

Why the default tolerance is two standard errors of the paired difference, and which one:
both models predict the same records, so the difference of their accuracies is the mean of
d_i = [candidate right] - [champion right] in {-1, 0, +1}. Records both get right or both get wrong
add nothing; only the discordant ones do: b where only the champion is right, c where only the
candidate is. The difference is (c - b) / n, and if the two models were equally good each
discordant record would go either way with probability 1/2 (McNemar's null hypothesis), so its
standard error is sqrt(b + c) / n. The tolerance is Z = 2 of those: a candidate is refused on a
slice only when it trails the champion by more than 2 * sqrt(b + c) / n.
- noise does not reject a model that is as good or better: an equally good candidate trails by more
  than 2 SE with probability ~2.3% per slice (one-sided normal tail; McNemar's z-test at z = 2);
- noise does not promote a worse one: a candidate whose true deficit is 4 SE or more is refused with
  probability ~97.7% (it must beat its expected deficit by 2 SE to pass).
The resolution follows the slice: 10,000 validation records on which two good MLPs disagree ~2% of
the time give sqrt(200) / 10,000 * 2 = 0.28 points; a 100-record feedback hold-out with 20
disagreements gives 8.9 points: small slices can only catch large regressions, and the table says
so. Pairing matters: the unpaired standard error of two accuracies near 97% on 10,000 records
(sqrt(2 * 0.97 * 0.03 / 10,000) = 0.24 points each way) ignores that the models agree on most
records, and would be loose where the models agree and wrong where they do not.
A fixed `margin` (`--margin`) replaces it on every slice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Z = 2.0
VALIDATION = "validation"
STATISTICAL = f"{Z:g} SE (paired)"


@dataclass(frozen=True)
class Slice:
    """Named records to compare the models on: images uint8 (N, 28, 28), labels (N,)."""

    name: str
    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SliceResult:
    name: str
    records: int
    candidate_accuracy: float
    champion_accuracy: float | None
    tolerance: float | None  # how far the candidate may trail the champion here; None: no champion
    basis: str  # STATISTICAL or "margin"
    passed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def paired_tolerance(candidate_ok: np.ndarray, champion_ok: np.ndarray, z: float = Z) -> float:
    """z standard errors of the paired accuracy difference under McNemar's null: z * sqrt(b + c) / n."""
    discordant = int(np.count_nonzero(candidate_ok != champion_ok))
    return z * math.sqrt(discordant) / len(candidate_ok)


def compare(name: str, labels: np.ndarray, candidate_pred: np.ndarray, champion_pred: np.ndarray | None,
            margin: float | None) -> SliceResult:
    """One slice: the candidate passes unless it trails the champion by more than the tolerance."""
    labels = np.asarray(labels)
    cand_ok = np.asarray(candidate_pred) == labels
    cand = float(cand_ok.mean())
    if champion_pred is None:
        return SliceResult(name, len(labels), cand, None, None, "margin" if margin is not None else STATISTICAL, True,
                           "no champion to compare with")
    champ_ok = np.asarray(champion_pred) == labels
    champ = float(champ_ok.mean())
    tol, basis = (margin, "margin") if margin is not None else (paired_tolerance(cand_ok, champ_ok), STATISTICAL)
    passed = cand >= champ - tol
    verb = "within" if passed else "worse than the champion beyond"
    return SliceResult(name, len(labels), cand, champ, tol, basis, passed,
                       f"{cand:.4f} vs the champion's {champ:.4f}: {verb} the tolerance {tol:.4f} ({basis})")


def verdict(results: list[SliceResult], parity_passed: bool, threshold: float) -> tuple[bool, str]:
    """(accepted, reason): parity, the threshold on the validation split (results[0]), then every
    slice not worse than the champion beyond its tolerance."""
    val = results[0]
    if not parity_passed:
        return False, "ONNX parity check failed"
    if val.candidate_accuracy < threshold:
        return False, f"validation accuracy {val.candidate_accuracy:.4f} < threshold {threshold:.4f}"
    failed = [r for r in results if not r.passed]
    if failed:
        return False, "worse than the champion on " + "; ".join(
            f"{r.name} ({r.candidate_accuracy:.4f} vs {r.champion_accuracy:.4f}, tolerance {r.tolerance:.4f} "
            f"{r.basis}, {r.records} records)" for r in failed)
    head = f"validation accuracy {val.candidate_accuracy:.4f} >= {threshold:.4f}, parity passed"
    if val.champion_accuracy is None:
        return True, f"{head}, no champion yet"
    return True, (f"{head}, not worse than the champion's {val.champion_accuracy:.4f} beyond the tolerance on any "
                  f"of {len(results)} slice(s) ({', '.join(r.name for r in results)})")


def table(slices: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-slice table the model card and the Prefect artifact show."""
    header = ["slice", "records", "candidate", "champion", "difference", "tolerance", "basis", "result"]
    rows = []
    for s in slices:
        champ = s["champion_accuracy"]
        rows.append([s["name"], str(s["records"]), f"{s['candidate_accuracy']:.4f}",
                     "-" if champ is None else f"{champ:.4f}",
                     "-" if champ is None else f"{s['candidate_accuracy'] - champ:+.4f}",
                     "-" if s["tolerance"] is None else f"{s['tolerance']:.4f}", s["basis"],
                     "pass" if s["passed"] else "FAIL"])
    return header, rows
