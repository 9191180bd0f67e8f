"""`mnistops monitor`: how each registered version did, batch after batch, from its monitoring
record (serving.monitor): the recent batches as an aligned table and their trend.

Exit codes: 0 shown (also when no batch was recorded yet), 1 the model named by --model is not
registered (one line naming it and the registered ones) or the store failed, 2 bad usage.
Torch- and Prefect-free: it reads MLflow only.
"""

from __future__ import annotations

import math

from flows.options import POSITIVE, CommandError
from serving import monitor

COLUMNS = ("time (UTC)", "records", "above t", "class TV", "mean conf", "accuracy", "drift")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cells(p: monitor.Point) -> tuple[str, ...]:
    return (p.at.strftime("%Y-%m-%d %H:%M:%S"), str(p.records), _pct(p.exceed_fraction), _num(p.class_tv, 3),
            _num(p.mean_confidence, 3), _num(p.accuracy, 4), p.status)


def table(points: list[monitor.Point]) -> list[str]:
    """The points as aligned lines: text left, figures right."""
    rows = [COLUMNS] + [_cells(p) for p in points]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    left = {0, len(COLUMNS) - 1}
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return sum(known) / len(known) if known else None


def trend(points: list[monitor.Point]) -> str:
    """The later half of `points` against the earlier half: each figure's mean, and the alerts."""
    if len(points) < 2:
        return "trend: one batch, nothing to compare yet"
    half = len(points) // 2
    before, after = points[:len(points) - half], points[len(points) - half:]

    def change(name: str, fmt) -> str:
        a, b = (_mean([getattr(p, name) for p in part]) for part in (before, after))
        arrow = "" if a is None or b is None else (" (up)" if b > a else " (down)" if b < a else " (same)")
        return f"{fmt(a)} -> {fmt(b)}{arrow}"

    alerts = [sum(p.status == "alert" for p in part) for part in (before, after)]
    return (f"trend (last {len(after)} vs the {len(before)} before): above t {change('exceed_fraction', _pct)}, "
            f"class TV {change('class_tv', lambda x: _num(x, 3))}, mean conf "
            f"{change('mean_confidence', lambda x: _num(x, 3))}, accuracy {change('accuracy', lambda x: _num(x, 4))}, "
            f"alerts {alerts[0]} -> {alerts[1]}")


def report(client, name: str, last: int) -> list[str]:
    """The lines for one registered model: each version with batches, newest version first."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise CommandError(f"--model {name}: no registered model of that name (registered: "
                           f"{', '.join(names) or 'none'})") from None
    champion = (rm.aliases or {}).get("champion")
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int,
                      reverse=True)
    lines, quiet = [], []
    for version in versions:
        points = monitor.history(client, name, version)
        if not points:
            quiet.append(version)
            continue
        alerts = sum(p.status == "alert" for p in points)
        mark = " (champion)" if str(champion) == version else ""
        shown = points[-last:]
        lines += [f"{name} version {version}{mark}: {len(points)} batch(es), {alerts} alert(s); "
                  f"the last {len(shown)}:", *("  " + row for row in table(shown)), "  " + trend(shown), ""]
    if quiet:
        lines.append(f"{name}: no batch recorded yet for version(s) {', '.join(quiet)}")
    return lines or [f"{name}: no versions"]


def cmd_monitor(args) -> int:
    import mlflow

    from common.errors import EXIT_OK
    from common.settings import mlflow_client
    from common.storage import redact_url

    client = mlflow_client()
    names = [args.model] if args.model else sorted(m.name for m in client.search_registered_models())
    if not names:
        print(f"no registered models in {redact_url(mlflow.get_tracking_uri())}")
        return EXIT_OK
    out: list[str] = []
    for name in names:
        out += report(client, name, args.last) + [""]
    print("\n".join(out).rstrip())
    return EXIT_OK


def add(command) -> None:
    p = command("monitor", cmd_monitor, "each model version's recent batch jobs from its monitoring record in MLflow "
                                        "(batch size, share above the out-of-distribution threshold, predicted-class "
                                        "distance, mean confidence, accuracy, drift) and their trend")
    p.add_argument("--model", default=None, metavar="NAME", help="registered model (default: every registered model)")
    p.add_argument("--last", type=POSITIVE, default=10, metavar="N", help="batches shown per version, newest last")
