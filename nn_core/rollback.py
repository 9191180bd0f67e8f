"""Rollback, and the champion's history (the alias history) it is defined on.

The history is derived, never kept: it is the replay of the decision records (nn_core.registry:
one JSON per decision, `gate/v<N>/decision-<at>.json` on the version's run) in the rule's order
(`promotion.at`), the champion after each decision being what `rule_champion` says of the decisions
so far. A change of that answer is one entry: when (`promotion.at`, a time in milliseconds), from
which version to which, why (the decision's reason) and by which command (the record's `command`:
the gate of a flow run and what started it, `mnistops promote`, `mnistops rollback`).
Why not a list of changes kept beside the alias (a registered-model tag, a file): it would be a
second mutable record of one fact, written after the decision by a command that may die in
between, and read-modify-written by gates that share no lock (two hosts on one MLflow server), so
it could lose entries or disagree with the rule. The records are written once each, before the
decision's tags, by whoever decides, under the same lock, on any store (a SQLite store's artifact
folder or an MLflow server's artifact store alike); the replay agrees with the rule by construction.
A record whose version's tags never reached it (the command died in between, and the decision was
then made again or never) did not take effect and is left out.

The previous champion: the history read as a stack of reigns. A gate or `promote` that changes the
champion pushes its version; a rollback to a version in the stack pops back to it (what came after
it is abandoned), a rollback to one that is not pushes it. `rollback` without a version restores the
nearest version below the current champion's place that is still valid: its latest decision
accepted, of the registered model's task by its run's own record, parity passed on that record.
So a second rollback goes one reign further back instead of flipping back (v1 -> v2 -> v3, rollback:
v2, rollback: v1, rollback: nothing earlier), and a promotion after a rollback starts a new branch
(v1 -> v2 -> v3, rollback: v2, promote v4, rollback: v2, not the abandoned v3).

A rollback is a decision like the gate's: under the promotion lock it reads every decision, records
an accepted decision for the target with a `promotion.at` after all of them (reason "rolled back from
vX to vY by mnistops rollback", the figures of the target's own last decision: a rollback re-checks
the task and parity, not the threshold), then publishes it with `settle`. Whoever decides next
compares with the restored champion.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from common.errors import EXIT_NO_ROLLBACK
from nn_core import registry, tracking

COMMAND = "command"  # record key: which command decided (a gate's flow run, promote, rollback)
ROLLED_BACK_FROM = "rolled_back_from"  # record key of a rollback's decision: the champion it replaced


class NothingToRollBack(ValueError):
    """No champion, or no valid champion before the current one: the champion stays (exit code
    EXIT_NO_ROLLBACK, a normal outcome for a script that rolls back when a model looks worse)."""

    exit_code = EXIT_NO_ROLLBACK


@dataclass(frozen=True)
class Decided:
    """One decision, as the replay reads it."""

    at: int
    version: str
    promotion: str
    reason: str
    command: str
    rolled_back_from: str | None = None


@dataclass(frozen=True)
class Change:
    """One change of the champion: `before` -> `after` (None: no champion), by the decision `by`."""

    before: str | None
    after: str | None
    by: Decided


@dataclass(frozen=True)
class RolledBack:
    model_name: str
    before: str
    after: str
    decision: registry.GateDecision | None  # None: `--to` named the champion itself, nothing recorded
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (version, why) passed over


def _at(tags: dict) -> int:
    try:
        return int((tags or {}).get(registry.AT, "-1"))
    except ValueError:
        return -1


def _versions(model_name: str) -> list:
    return tracking.client().search_model_versions(f"name = '{model_name}'")


def _who(body: dict) -> str:
    if body.get(COMMAND):
        return str(body[COMMAND])
    if body.get("completed"):
        return "completion of a cut-short registration"
    return "gate"  # recorded before records named their command


def _records(model_name: str, mv) -> list[Decided]:
    """The decision records of one version that took effect (see the module's docstring)."""
    tags, version = mv.tags or {}, str(mv.version)
    latest = _at(tags)
    if latest < 0 or not mv.run_id:
        return []
    folder = f"{registry.DECISIONS}/v{version}"
    c = tracking.client()
    if not c.list_artifacts(mv.run_id, folder):
        return []
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(c.download_artifacts(mv.run_id, folder, tmp))
        for path in sorted(local.glob("decision-*.json")):
            try:
                body = json.loads(path.read_text())
                at, accepted = int(body["decided_at"]), bool(body["accepted"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"registered model {model_name!r} version {version}: decision record "
                                 f"runs:/{mv.run_id}/{folder}/{path.name} is not a decision "
                                 f"({type(e).__name__}: {e})") from None
            if at > latest:  # its tags were never written: it did not take effect
                continue
            out.append(Decided(at, version, registry.ACCEPTED if accepted else registry.REJECTED,
                               str(body.get("reason", "")), _who(body), body.get(ROLLED_BACK_FROM)))
    return out


def decisions(model_name: str, versions=None) -> list[Decided]:
    """Every decision on the versions of `model_name`, in the rule's order. A version's current tags
    stand for a decision that has no record (marked failed; decided before records existed)."""
    out = []
    for mv in _versions(model_name) if versions is None else versions:
        tags, version = mv.tags or {}, str(mv.version)
        found = _records(model_name, mv)
        if tags.get(registry.PROMOTION) in (registry.ACCEPTED, registry.REJECTED, registry.FAILED) \
                and _at(tags) not in {d.at for d in found}:
            found.append(Decided(_at(tags), version, tags[registry.PROMOTION], tags.get(registry.REASON, ""),
                                 "marked failed" if tags[registry.PROMOTION] == registry.FAILED else "gate"))
        out += found
    return sorted(out, key=lambda d: (d.at, int(d.version)))


def history(model_name: str, alias: str | None = None, versions=None) -> list[Change]:
    """The champion's changes, oldest first: the decisions replayed through `rule_champion`. `alias`
    orders the decisions made before decisions were ordered, as the rule does."""
    state: dict[str, Decided] = {}
    changes, current = [], None
    for d in decisions(model_name, versions):
        state[d.version] = d
        after = registry.rule_champion(
            [SimpleNamespace(version=v, tags={registry.PROMOTION: s.promotion, registry.AT: str(s.at)})
             for v, s in state.items()], alias)
        if after != current:
            changes.append(Change(current, after, d))
            current = after
    return changes


def reigns(changes: list[Change]) -> list[str]:
    """The history as a stack of reigns, the current champion last (see the module's docstring)."""
    stack: list[str] = []
    for ch in changes:
        if ch.after is None:
            continue
        below = stack[:-1]
        # A rollback, or a champion whose acceptance was undone (decided again: rejected), goes back
        # to a reign below; anything else starts a new one.
        back = ch.by.rolled_back_from is not None or ch.by.promotion != registry.ACCEPTED
        if back and ch.after in below:
            del stack[len(below) - below[::-1].index(ch.after):]
        else:
            stack.append(ch.after)
    return stack


def why_not(model_name: str, mv, bound: registry.Task) -> str | None:
    """Why a version cannot be champion again (None: it can): its latest decision is not an
    acceptance, or its run's own record names another task or a failed parity check."""
    tags = mv.tags or {}
    promotion = tags.get(registry.PROMOTION)
    if promotion != registry.ACCEPTED:
        if promotion in (registry.REJECTED, registry.FAILED):
            what = "marked failed" if promotion == registry.FAILED else "rejected by its latest decision"
            return f"it was {what} ({tags.get(registry.REASON) or 'no reason recorded'})"
        return "it has no decision yet"
    try:
        if not registry.check_version(model_name, mv, bound):
            return "its run records no passed ONNX parity check"
    except registry.TaskMismatchError as e:
        return str(e)
    return None


def previous(model_name: str, current: str, changes: list[Change], by_version: dict, bound) -> tuple[str, list]:
    """The version a rollback restores: the nearest valid one below `current` in the stack of
    reigns; (version, [(version, why) skipped]). NothingToRollBack when there is none."""
    stack = reigns(changes)
    if current in stack:
        stack = stack[:len(stack) - stack[::-1].index(current) - 1]
    skipped = []
    for v in reversed(stack):
        if v == current or v in {s for s, _ in skipped}:
            continue
        mv = by_version.get(v)
        why = "it is no longer registered" if mv is None else why_not(model_name, mv, bound)
        if why is None:
            return v, skipped
        skipped.append((v, why))
    passed = "; ".join(f"version {v}: {w}" for v, w in skipped)
    raise NothingToRollBack(f"registered model {model_name!r}: no earlier champion to roll back to from version "
                            f"{current}" + (f" (passed over {passed})" if passed else "") + "; the champion stays")


def _target(model_name: str, to: str, bound, by_version: dict) -> str:
    mv = by_version.get(to)
    if mv is None:
        raise ValueError(f"registered model {model_name!r} has no version {to} (its versions: "
                         f"{', '.join(sorted(by_version, key=int)) or 'none'})")
    why = why_not(model_name, mv, bound)
    if why is not None:
        raise ValueError(f"registered model {model_name!r}: version {to} cannot be champion again: {why}; "
                         "the champion stays")
    return to


def rollback(model_name: str, to: str | None = None, *, lock=registry.promotion_lock,
             command: str = "rollback") -> RolledBack:
    """Move the champion back to the previous champion (or to `to`), record that decision and
    publish it (`settle`). Refusals leave every record and the alias as they were: ValueError (no
    such model or version, a version of another task, without parity, rejected, failed or
    undecided), NothingToRollBack (no champion, or none before it)."""
    bound = registry.bound_task(model_name)  # ValueError when there is no such model
    with lock(model_name):
        versions = _versions(model_name)
        by_version = {str(v.version): v for v in versions}
        alias = registry.champion(model_name)
        current = registry.rule_champion(versions, alias)
        if current is None:
            if to is not None:
                _target(model_name, str(to), bound, by_version)
            raise NothingToRollBack(f"registered model {model_name!r} has no champion to roll back from")
        skipped = []
        if to is not None:
            target = _target(model_name, str(to), bound, by_version)
            if target == current:
                registry.settle(model_name)  # the alias may lag the rule; nothing else to do
                return RolledBack(model_name, current, current, None)
        else:
            target, skipped = previous(model_name, current, history(model_name, alias, versions), by_version, bound)
        decision = _decide(model_name, by_version[target], by_version[current], versions, command)
        registry.record_decision(model_name, by_version[target], decision,
                                 extra={COMMAND: command, ROLLED_BACK_FROM: current})
        settled = registry.settle(model_name)
    tracking.log_tags(by_version[target].run_id, {**decision.tags(), "registered_version": target})
    if settled != target:  # a gate that shares no lock with this command decided after it
        raise RuntimeError(f"registered model {model_name!r}: rolled back to version {target}, but version "
                           f"{settled} was decided after it and is the champion")
    return RolledBack(model_name, current, target, decision, skipped)


def _decide(model_name: str, target, current, versions, command: str) -> registry.GateDecision:
    """The rollback's decision: accepted, the target's own figures from its last decision (its
    accuracy, the threshold it met) beside the champion's it replaces."""
    mine, theirs = registry.recorded_decision(model_name, target), registry.recorded_decision(model_name, current)
    v, c = str(target.version), str(current.version)
    return registry.GateDecision(
        True, f"rolled back from v{c} to v{v} by {command}", model_name, v, mine.val_accuracy, True, c,
        theirs.val_accuracy, mine.threshold, mine.margin, False, registry.next_at(versions))
