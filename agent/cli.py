"""The ``agent`` command.

    agent serve                       # OpenAI-compatible server that learns while it serves
    agent serve --no-train            # a replica: serves, follows the promotions made elsewhere
    agent worker                      # consolidation only, for replicas sharing its database
    agent ask "What is 47 + 38?"      # one answer, with its route and confidence
    agent store ls | show | export | import | stats | prune | check | purge --source NAME
    agent consolidate [--dry-run]     # distil the buffer into a new adapter now
    agent adapters ls | show | rollback | prune
    agent scopes ls | rename OLD NEW | merge OLD NEW | pin NAME | unpin NAME
    agent schedule status
    agent calibrate --target-system2-rate 0.3
    agent bench system1 | paper | loop

Global options (before the command): --config agent.toml, --db, --model, --cache-dir, --log-level
(default: INFO for ``serve``, which logs one line per request; WARNING for the others).
Precedence: defaults < TOML < S2AGENT_* environment < flags. The whole configuration, prompt templates
included, is checked before anything loads: a bad value exits 2 with one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from agent.config import AgentConfig
from agent.errors import EXPECTED, ConfigError, describe

logger = logging.getLogger("agent.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = {"serve": "INFO", "worker": "INFO"}
"""Commands whose default log level is not WARNING: the server's one line per request, the worker's runs."""
MAX_ROW_ID = 2**31 - 1
"""Largest id or version the store can hold (its INTEGER columns are 32-bit on PostgreSQL)."""
MAX_HOURS, MAX_DAYS = 100 * 365 * 24, 100 * 365
"""A century: ages past it reach before year 1, where date arithmetic overflows."""


# --- output helpers --------------------------------------------------------------------------
def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _json(data: Any) -> None:
    _out(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _cut(value: Any, width: int) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str], widths: Sequence[int]) -> None:
    cells = [[_cut(v, w) for v, w in zip(row, widths)] for row in rows]
    sizes = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    _out("  ".join(h.ljust(s) for h, s in zip(headers, sizes)))
    for row in cells:
        _out("  ".join(v.ljust(s) for v, s in zip(row, sizes)))


def _row_dict(row: Any) -> dict[str, Any]:
    return {c: getattr(row, c) for c in row.__table__.columns.keys()}


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _bounded(kind: type[float], low: float, high: float) -> Callable[[str], Any]:
    """An argparse type: an ``int`` or a ``float`` (``kind``) in ``[low, high]``. Out of range, a number would overflow
    date arithmetic or the database's integer columns later, as a traceback; here it is one usage error."""

    def parse(text: str) -> Any:
        shown = _cut(text, 24)
        try:
            value = kind(text)
        except ValueError:  # an int of over 4,300 digits is a ValueError too
            raise argparse.ArgumentTypeError(f"{shown!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high:  # False for NaN
            raise argparse.ArgumentTypeError(f"{shown} is not between {low:g} and {high:g}" if kind is float
                                             else f"{shown} is not between {low} and {high}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, links resolved, lies inside ``folder`` (and is not ``folder`` itself)."""
    try:
        resolved, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError):  # a link loop
        return False
    return resolved != root and resolved.is_relative_to(root)


# --- building blocks -------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> AgentConfig:
    overrides = {"db": args.db, "model": args.model, "cache_dir": args.cache_dir,
                 "routing.threshold": getattr(args, "threshold", None),
                 "system2.method": getattr(args, "method", None)}
    for key in ("host", "port", "admin_token", "api_key"):
        if getattr(args, key, None) is not None:
            overrides[f"server.{key}"] = getattr(args, key)
    if getattr(args, "allow_unauthenticated", False):
        overrides["server.allow_unauthenticated"] = True
    for key in ("interval_minutes", "min_pending", "cooldown_minutes"):
        if getattr(args, key, None) is not None:
            overrides[f"scheduler.{key}"] = getattr(args, key)
    return AgentConfig.load(args.config, overrides=overrides)


def _store(config: AgentConfig):
    from store import Store

    return Store(config.db_url())


def _agent(config: AgentConfig):
    from agent.loop import Agent

    logger.info("loading model %s", config.model)
    return Agent(config)


# --- commands --------------------------------------------------------------------------------
def cmd_ask(args, config) -> int:
    with _agent(config) as agent:
        answer = agent.answer(args.question, route=args.route, method=args.method, tag=args.tag)
    if args.json:
        _json(dataclasses.asdict(answer))
    else:
        _out(answer.text)
        extra = f", method {answer.method}, votes {answer.votes}, accepted {answer.accepted}" if answer.method else ""
        conf = f"{answer.confidence:.2f}" if answer.confidence is not None else "n/a"
        _out(f"[{answer.route}, confidence {conf}, adapter {answer.adapter_version or 'base'}, "
             f"{answer.tokens} tokens, {answer.latency_ms:.0f} ms{extra}]")
        if answer.error:
            _out(f"[System 2 fell back: {answer.error}]")
    return 0


def cmd_serve(args, config) -> int:
    from agent.auth import KeyRing, check_exposure
    from agent.sandbox import sandbox_report  # model-written programs run here: say at start what holds them
    from agent.server import serve

    if args.no_train:
        config.scheduler.enabled = False
    keys = KeyRing.load(config.server)  # a bad keys file, or an exposed server without keys: one line, no model load
    check_exposure(config.server.host, keys, config.server.allow_unauthenticated)
    agent = _agent(config)
    sched = config.scheduler
    if not sched.enabled:
        scheduler = "off (serving only: following the promotions of other processes)"
    elif not (sched.interval_minutes or sched.min_pending):
        scheduler = "off (scheduler.min_pending and scheduler.interval_minutes are both off)"
    else:
        agent.start_scheduler()
        scheduler = (f"at {sched.min_pending or '-'} pending per scope / every {sched.interval_minutes or '-'} min,"
                     f" in a {'child process' if sched.process == 'child' else 'thread'}")
    agent.follow_promotions()  # promotions made by a worker (or the child process) serve without a request
    if config.server.write_behind:
        agent.start_write_behind()
    version = agent.serving_version()
    for failure in agent.adapter_failures():  # never silent: the registry names an adapter that does not load
        instead = f"v{failure['serving_version']}" if failure["serving_version"] else "the base model"
        sys.stderr.write(f"s2agent: WARNING: adapter v{failure['version']} ({failure['scope'] or 'general'} scope) "
                         f"does not load ({failure['error']}); serving {instead} for that scope until its files "
                         "are restored or it is rolled back (agent adapters rollback)\n")
    access = (f"{len(keys.keys)} API key(s): {', '.join(keys.names())}" if keys.configured
              else "no API keys: every client may be answered, teach and steer")
    sys.stderr.write(
        f"s2agent: model {agent.model_name}, adapter {'v' + str(version) if version else 'none (base model)'}, "
        f"database {config.db_display()}, consolidation scheduler {scheduler}\n"
        f"s2agent: program sandbox: {sandbox_report()}\n"
        f"s2agent: access: {access}\n"
        f"s2agent: serving the OpenAI API at http://{config.server.host}:{config.server.port}/v1\n"
    )
    serve(agent, config.server.host, config.server.port)
    return 0


def cmd_worker(args, config) -> int:
    from agent.server import serve

    config.scheduler.enabled = True
    config.scheduler.process = args.process
    sched = config.scheduler
    if not (sched.interval_minutes or sched.min_pending):
        raise ConfigError("agent worker has nothing to do: scheduler.min_pending and scheduler.interval_minutes "
                          "are both off")
    agent = _agent(config)
    agent.start_scheduler()
    sys.stderr.write(
        f"s2agent worker: model {agent.model_name}, database {config.db_display()}, adapters {config.adapters_path()}\n"
        f"s2agent worker: consolidating at {sched.min_pending or '-'} pending per scope / every "
        f"{sched.interval_minutes or '-'} min, in a {'child process' if sched.process == 'child' else 'thread'}\n"
        f"s2agent worker: health and metrics at http://{config.server.host}:{config.server.port}/metrics\n"
    )
    serve(agent, config.server.host, config.server.port, worker=True)
    return 0


def cmd_store(args, config) -> int:
    if args.store_cmd == "check":
        return _store_check(args, config)
    with _store(config) as store:
        if args.store_cmd == "ls":
            since = datetime.now(timezone.utc) - timedelta(hours=args.since) if args.since else None
            rows = store.list_examples(status=args.status, method=args.method, limit=args.limit, since=since,
                                       order="desc", source=args.source)
            if args.json:
                _json([_row_dict(r) for r in rows])
            else:
                _table([(r.id, r.status, r.method, f"{r.agreement:.2f}" if r.agreement is not None else "",
                         r.tag or "", r.source or "-", _when(r.created_at), r.input, r.target) for r in rows],
                       ["id", "status", "method", "agree", "scope", "source", "created", "input", "target"],
                       [6, 8, 6, 5, 20, 16, 16, 44, 20])
        elif args.store_cmd == "show":
            row = store.get_example(args.id)
            if row is None:
                _out(f"no example with id {args.id}")
                return 1
            shown = _row_dict(row)
            interaction = store.get_interaction(row.interaction_id) if row.interaction_id else None
            if interaction is not None:  # for audit: what System 2's samples wrote (programs, reasoning)
                shown["samples"] = (interaction.route_reason or {}).get("samples")
            _json(shown)
        elif args.store_cmd == "export":
            n = store.export_examples(args.output or sys.stdout, status=args.status)
            if args.output:
                _out(f"exported {n} examples to {args.output}")
        elif args.store_cmd == "import":
            n = store.import_examples(args.file, source=args.source)
            _out(f"imported {n} examples from {args.file}")
        elif args.store_cmd == "stats":
            stats = store.stats()
            it = stats["interactions"]
            it["teacher_cost"] = config.system2.teacher.cost(it.get("teacher_prompt_tokens", 0),
                                                             it.get("teacher_completion_tokens", 0))
            if args.json:
                _json(stats)
            else:
                _print_stats(stats)
        elif args.store_cmd == "prune":
            before = datetime.now(timezone.utc) - timedelta(days=args.older_than_days) if args.older_than_days else None
            _out(f"pruned {store.prune_examples(args.status, before)} {args.status} examples")
        elif args.store_cmd == "purge":
            return _purge(store, args.source, args.yes)
    return 0


def _store_check(args, config) -> int:
    """``agent store check``: 0 when the database is whole, 1 with its first problems listed when not.

    Opens nothing for writing (a damaged file must stay as it is); see :func:`store.check_database`."""
    from store import check_database

    report = check_database(config.db_url(), full=not args.quick)
    if args.json:
        _json({**dataclasses.asdict(report), "ok": report.ok})
        return 0 if report.ok else 1
    size = f", {report.size_bytes / 1e6:.1f} MB" if report.size_bytes is not None else ""
    version = f"schema version {report.schema_version}" if report.schema_version is not None else "no s2agent schema yet"
    how = ("PRAGMA " + ("quick_check" if args.quick else "integrity_check")) if report.backend == "sqlite" else "connected"
    if report.ok:
        _out(f"ok: {report.where} ({report.backend}{size}, {version}, this s2agent: {report.supported}; "
             f"{how} in {report.seconds:.2f} s)")
        return 0
    label = "damaged" if report.advice else "not usable"  # advice: SQLite found damaged pages; else e.g. a newer schema
    _out(f"{label}: {report.where} ({report.backend}{size}; {how} in {report.seconds:.2f} s); first problems:")
    for problem in report.problems:
        _out(f"  {problem}")
    if report.advice:
        _out(report.advice)
    return 1


def _purge(store, source: str, yes: bool) -> int:
    """``agent store purge --source NAME``: what it would do, a confirmation (or ``--yes``), one line of outcome."""
    plan = store.purge_source(source, dry_run=True)
    if not plan.examples:
        _out(f"source {source!r} has no examples; nothing purged")
        return 0
    flagged = ", ".join(f"v{v}" for v in plan.adapters) or "none"
    if not yes:
        if not sys.stdin.isatty():
            sys.stderr.write(f"agent: error: purging {plan.examples} examples of source {source!r} needs confirmation:"
                             " run it in a terminal, or add --yes\n")
            return 2
        reply = input(f"delete {plan.examples} examples of source {source!r} ({_counts(plan.by_status)}) and flag "
                      f"adapters {flagged} for retraining? [y/N] ")
        if reply.strip().lower() not in ("y", "yes"):
            _out("nothing purged")
            return 1
    report = store.purge_source(source)
    serving = f" (serving now: {', '.join(f'v{v}' for v in report.serving)}: roll back or consolidate)" \
        if report.serving else ""
    _out(f"purged source {source!r}: {report.examples} examples ({_counts(report.by_status)}); adapters flagged for "
         f"retraining: {', '.join(f'v{v}' for v in report.adapters) or 'none'}{serving}")
    return 0


def _counts(by_status: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))


def _print_stats(stats: dict[str, Any]) -> None:
    ex, it = stats["examples"], stats["interactions"]
    _out(f"examples: {ex['total']}  by status: {ex['by_status']}  by method: {ex['by_method']}")
    _out(f"interactions: {it['total']}  by route: {it['by_route']}  System 2 rate: {_pct(it.get('system2_rate'))}"
         f"  acceptance: {_pct(it.get('system2_acceptance_rate'))}")
    _out(f"tokens: System 1 {it.get('tokens_system1', 0)}, System 2 {it.get('tokens_system2', 0)}"
         f" in {it.get('system2_calls', 0)} calls; System 2 ran for {it.get('system2_runs', 0)} queries"
         " (answered by it or labelled in the background)")
    if it.get("teacher_prompt_tokens") or it.get("teacher_completion_tokens"):
        taught = it.get("teacher_accepted", 0)
        per_example = (it["teacher_prompt_tokens"] + it["teacher_completion_tokens"]) / taught if taught else None
        cost = f", cost {it['teacher_cost']:.4f}" if it.get("teacher_cost") is not None else ""
        _out(f"teacher: {it['teacher_prompt_tokens']} prompt + {it['teacher_completion_tokens']} completion tokens"
             f"{cost}; {taught} accepted answers"
             + (f", {per_example:.0f} tokens each" if per_example is not None else ""))
    growth = ex.get("added_per_day") or {}
    if growth:
        _out("added per day: " + ", ".join(f"{d[5:]}: {n}" for d, n in growth.items() if n))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def cmd_consolidate(args, config) -> int:
    with _agent(config) as agent:
        report = agent.consolidate(progress=not args.json, dry_run=args.dry_run, min_examples=args.min_examples,
                                   epochs=args.epochs, scope=args.tag)
    if args.json:
        _json(report.to_dict())
        return 0 if report.status in ("promoted", "rejected", "skipped", "dry-run") else 1
    if args.dry_run:
        _table([(p["source"], p["input"], p["target"]) for p in report.train_preview],
               ["source", "input", "target"], [9, 60, 20])
        _out(f"would train on {report.n_new} new + {report.n_replay} replayed{_variations_note(report)} + "
             f"~{report.n_retention} retention examples; {report.n_holdout} held out")
        return 0
    _out(f"consolidation {report.status}: {report.reason}")
    if report.adapter_version:
        _out(f"adapter v{report.adapter_version} (parent {report.parent_version or 'base'}): trained on "
             f"{report.n_new} new + {report.n_replay} replayed{_variations_note(report)} + {report.n_retention} "
             f"retention examples in {report.seconds:.0f} s")
    return 0 if report.status != "failed" else 1


def _variations_note(report: Any) -> str:
    """" + N variations (M more held out)" when the run made variations of its solved questions."""
    made = report.metrics.get("variations")
    if not made or not made["train"]:
        return ""
    return f" + {made['train']} variations ({made['holdout']} more held out)"


def _load_error(store: Any, row: Any) -> str | None:
    """Why a server could not load ``row``'s files, or None: the files-only half of loading (no model here).
    With a copy in the store (what servers load from), that copy is checked against its sha256."""
    from agent.backends.base import validate_adapter_dir

    if row.files_deleted:
        return f"its files were pruned ({row.path})"
    try:
        if store.adapter_manifest(row.version):
            store.read_adapter_files(row.version)
        else:
            validate_adapter_dir(row.path)
    except EXPECTED as exc:
        return str(exc)
    return None


def _first_loadable(store: Any, rows: list[Any], action: str) -> Any:
    """Check-then-commit for the CLI: the first of ``rows`` whose files load; AdapterError if none does."""
    from agent.errors import AdapterError

    failures = []
    for row in rows:
        why = _load_error(store, row)
        if why is None:
            return row
        failures.append(f"v{row.version}: {why}")
    name = f"v{rows[0].version}" if len(rows) == 1 else "any ancestor"
    raise AdapterError(f"cannot {action} {name}: its weights do not load ({'; '.join(failures)}); nothing changed")


def cmd_adapters(args, config) -> int:
    with _store(config) as store:
        if args.adapters_cmd == "ls":
            rows = store.list_adapters()
            # What serves is what loads: a registry row marked serving whose files do not load is flagged,
            # since every server keeps its previous adapter (or the base model) for that scope instead.
            broken = {r.version: why for r in rows if r.serving and (why := _load_error(store, r)) is not None}
            if args.json:
                _json([{**_row_dict(r), "load_error": broken.get(r.version)} for r in rows])
                return 0
            _table([(f"v{r.version}", f"v{r.parent}" if r.parent else "base", r.scope or "general", r.status,
                     ("!" if r.version in broken else "*") if r.serving else "", _when(r.created_at), r.n_train,
                     _fmt(r.metrics.get("holdout_accuracy_candidate")), _fmt(r.metrics.get("retention_likelihood")),
                     _fmt(r.metrics.get("retention")), "retrain" if r.needs_retrain else "")
                    for r in rows],
                   ["version", "parent", "scope", "status", "serving", "created", "trained", "holdout", "ret.lik",
                    "ret.text", "flag"],
                   [8, 8, 12, 10, 7, 16, 7, 7, 7, 8, 7])
            if not any(r.serving for r in rows):
                _out("(no adapter serves: the base model answers)")
            for version, why in broken.items():
                _out(f"! v{version} is marked serving but does not load ({why}): servers keep the adapter they had,"
                     " or the base model, for its scope; restore its files or roll back (agent adapters rollback)")
            if any(r.needs_retrain and r.serving for r in rows):
                _out("(retrain: it learned from examples `agent store purge` took back; roll back to an unflagged "
                     "version, or consolidate again)")
        elif args.adapters_cmd == "show":
            row = store.get_adapter(args.version)
            if row is None:
                _out(f"no adapter v{args.version}")
                return 1
            _json(_row_dict(row))
        elif args.adapters_cmd == "rollback":
            if args.version == 0:
                row = store.rollback(0, scope=args.tag)
            else:  # check the files first: a rollback to weights that do not load is refused, nothing changes
                target = _first_loadable(store, store.rollback_targets(args.version, scope=args.tag), "roll back to")
                row = store.rollback(target.version, scope=args.tag)
            _out(f"now serving {'v' + str(row.version) if row else 'the base model'}"
                 " (a running server follows within seconds)")
        elif args.adapters_cmd == "prune":
            return _prune_adapters(store, args.keep, config.adapters_path())
    return 0


def _prune_adapters(store: Any, keep: int, root: Path) -> int:
    """Delete the folders of the adapters the store prunes, but only inside ``root``: a registry row holds a
    path, and a row that names ``/home`` (by mistake or by an attacker with the database) must not make
    ``prune`` delete it. Such folders are left alone and reported; the exit status is then 1."""
    refused = 0
    for row in store.prune_adapters(keep):
        path = Path(row.path)
        if not _inside(path, root):
            refused += 1
            _out(f"not deleting v{row.version}'s folder {row.path}: it is not inside the adapters folder {root}")
            continue
        shutil.rmtree(path, ignore_errors=True)
        _out(f"pruned v{row.version} ({row.path})")
    return 1 if refused else 0


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else ""


def cmd_scopes(args, config) -> int:
    with _store(config) as store:
        if args.scopes_cmd == "ls":
            rows = store.scopes()
            if args.json:
                _json(rows)
                return 0
            _table([(s["scope"], sum(s["examples"].values()), s["examples"].get("pending", 0),
                     s["examples"].get("used", 0), s["interactions"],
                     f"v{s['serving_version']}" if s["serving_version"] else "", "pinned" if s["pinned"] else "")
                    for s in rows],
                   ["scope", "examples", "pending", "used", "interactions", "serving", "flag"], [32, 8, 7, 5, 12, 7, 6])
            if not rows:
                _out("(no scopes yet: untagged System 2 examples form them as they are accepted)")
        elif args.scopes_cmd == "pin":
            store.pin_scope(args.scope, reason=args.reason or "")
            serving = next((s["serving_version"] for s in store.scopes() if s["scope"] == args.scope.strip()), None)
            _out(f"pinned scope {args.scope!r}: no consolidation trains it until `agent scopes unpin`; "
                 f"{'v' + str(serving) if serving else 'the base model'} keeps serving it")
        elif args.scopes_cmd == "unpin":
            was = store.unpin_scope(args.scope)
            _out(f"scope {args.scope!r} {'may learn again' if was else 'was not pinned'}")
        else:
            merge = args.scopes_cmd == "merge"
            moved = store.rename_scope(args.old, args.new, merge=merge)
            _out(f"{'merged' if merge else 'renamed'} scope {args.old!r} into {args.new!r}: {moved} examples moved"
                 " (a running server follows within seconds)")
    return 0


def cmd_schedule(args, config) -> int:
    with _store(config) as store:
        sched = config.scheduler
        last = store.last_run()
        holder = store.lock_holder("consolidation")
        pending = store.count_examples(status="pending")
        info: dict[str, Any] = {
            "enabled": sched.enabled, "process": sched.process,
            "interval_minutes": sched.interval_minutes, "min_pending": sched.min_pending, "pending": pending,
            "running": f"pid {holder.pid} on {holder.host}" if holder else None,
            "last_run": _row_dict(last) if last else None,
        }
        if sched.interval_minutes and last:
            info["next_run_after"] = (last.started_at + timedelta(minutes=sched.interval_minutes)).isoformat()
        if args.json:
            _json(info)
            return 0
        if not sched.enabled or not (sched.interval_minutes or sched.min_pending):
            _out("scheduler: off (scheduler.enabled, scheduler.interval_minutes, scheduler.min_pending)")
        else:
            _out(f"scheduler: every {sched.interval_minutes or '-'} min; when pending >= {sched.min_pending or '-'}"
                 f" ({'child processes' if sched.process == 'child' else 'a thread'} of agent serve)")
        _out(f"pending examples: {pending}")
        _out(f"running now: {info['running'] or 'no'}")
        if "next_run_after" in info:
            _out(f"next interval run after: {info['next_run_after']}")
        if last:
            _out(f"last run #{last.id}: {last.status} at {_when(last.started_at)}: {last.reason or ''}")
        else:
            _out("last run: never")
    return 0


def _agrees(system1: str | None, final: str | None, kind: str) -> bool:
    from policies.answers import answers_match, normalise

    return answers_match(normalise(system1 or "", kind), normalise(final or "", kind), kind)


def cmd_calibrate(args, config) -> int:
    from policies.routing import calibrate

    with _store(config) as store:
        records = [(i.confidence, _agrees(i.system1_answer, i.final_answer, config.answer_kind_for(i.tag)))
                   for i in store.list_interactions(route="system2", limit=100_000)
                   if i.accepted and i.confidence is not None]
    result = calibrate(records, target_system2_rate=args.target_system2_rate, target_precision=args.target_precision)
    if args.json:
        _json(dataclasses.asdict(result))
        return 0
    _table([(f"{p.threshold:.3f}", _pct(p.system2_rate), _pct(p.system1_precision), _pct(p.system1_coverage))
            for p in result.curve], ["threshold", "system2", "s1 precision", "s1 coverage"], [9, 8, 12, 11])
    _out(f"chosen threshold for {result.target}: {result.threshold:.3f} (from {result.n} interactions)")
    _out(f"use it with: S2AGENT_ROUTING__THRESHOLD={result.threshold:.3f} or [routing] threshold = "
         f"{result.threshold:.3f}")
    return 0


def cmd_bench(args, config) -> int:
    from bench.cli import main as bench_main  # the runtime never imports the benchmarks until asked to

    return bench_main(args.bench_args, config)


# --- parser ----------------------------------------------------------------------------------
def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    """The consolidation triggers, for ``serve`` and ``worker``."""
    p.add_argument("--interval-minutes", dest="interval_minutes", type=float,
                   help="consolidate every scope with enough examples every N minutes (default 60; 0: off)")
    p.add_argument("--min-pending", dest="min_pending", type=int,
                   help="consolidate a scope when N of its examples are pending (default 16; 0: off)")
    p.add_argument("--cooldown-minutes", dest="cooldown_minutes", type=float,
                   help="the pending trigger waits N minutes after a scope's last run ended (default 15; 0: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent", description="s2agent: System 2 distilled into System 1, live.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--db", help="SQLite path or SQLAlchemy URL (default: $XDG_DATA_HOME/s2agent/agent.db)")
    parser.add_argument("--model", help="'default' (embedded SmolLM2-135M-Instruct), a local folder or a HF id")
    parser.add_argument("--cache-dir", help="model cache (default: $XDG_CACHE_HOME/s2agent)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help=f"{', '.join(LOG_LEVELS)} (any case); default INFO for serve, WARNING otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the OpenAI-compatible server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--admin-token", dest="admin_token")
    p.add_argument("--api-key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on /v1 (one key with every right; named keys and "
                        "rights: server.api_keys, server.api_keys_file, S2AGENT_API_KEYS)")
    p.add_argument("--allow-unauthenticated", dest="allow_unauthenticated", action="store_true",
                   help="serve a non-loopback --host without API keys (anyone who reaches it may teach the model)")
    _add_schedule_options(p)
    p.add_argument("--no-train", dest="no_train", action="store_true",
                   help="serve only: no consolidation here; follow the promotions made by another process")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="consolidate only: train, gate and promote for the replicas sharing the "
                                      "database; serves health and metrics, answers no one")
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=8001, help="health and metrics port (default 8001)")
    _add_schedule_options(p)
    p.add_argument("--process", choices=("thread", "child"), default="thread",
                   help="train in this process (default: a worker has its cores to itself) or in a child process")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("ask", help="answer one question")
    p.add_argument("question")
    p.add_argument("--route", default="auto", choices=["auto", "system1", "system2"])
    p.add_argument("--method", help="System 2 method: auto, cot, rar, s2a, bsm, pal, direct; teacher:<method> "
                                    "runs it on [system2.teacher] (e.g. teacher:cot)")
    p.add_argument("--tag", help="task tag (selects method/adapter by tag)")
    p.add_argument("--threshold", type=float, help="routing threshold for this call")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("store", help="inspect and manage the distillation buffer")
    ss = p.add_subparsers(dest="store_cmd", required=True)
    q = ss.add_parser("ls", help="list examples")
    q.add_argument("--status", choices=["pending", "used", "rejected", "holdout"])
    q.add_argument("--method")
    q.add_argument("--limit", type=_bounded(int, 1, MAX_ROW_ID), default=50)
    q.add_argument("--since", type=_bounded(float, 0.0, float(MAX_HOURS)), help="only the last N hours")
    q.add_argument("--source", help="only the examples this source (an API key's name, local, anonymous) taught")
    q.add_argument("--json", action="store_true")
    q = ss.add_parser("show", help="one example, all fields")
    q.add_argument("id", type=_bounded(int, 0, MAX_ROW_ID))
    q = ss.add_parser("export", help="examples as JSONL")
    q.add_argument("--format", default="jsonl", choices=["jsonl"])
    q.add_argument("--status")
    q.add_argument("-o", "--output", help="file (default: stdout)")
    q = ss.add_parser("import", help="import JSONL (the export format, or {\"input\", \"target\"} lines)")
    q.add_argument("file")
    q.add_argument("--source", default="local", help="source of lines that name none (default: local)")
    q = ss.add_parser("stats", help="counts, route and acceptance rates, tokens spent")
    q.add_argument("--json", action="store_true")
    q = ss.add_parser("prune", help="delete examples of a status")
    q.add_argument("--status", required=True, choices=["rejected", "used", "pending", "holdout"])
    q.add_argument("--older-than-days", type=_bounded(float, 0.0, float(MAX_DAYS)))
    q = ss.add_parser("check", help="is the database whole? (SQLite: integrity_check, read-only; exit 1 if not)")
    q.add_argument("--quick", action="store_true", help="PRAGMA quick_check: faster, skips the index comparison")
    q.add_argument("--json", action="store_true")
    q = ss.add_parser("purge", help="delete every example one source taught; flag the adapters that learned them")
    q.add_argument("--source", required=True, help="the source (an API key's name) to take back")
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("consolidate", help="distil the buffer into a new LoRA adapter now")
    p.add_argument("--dry-run", action="store_true", help="show what would be trained on")
    p.add_argument("--min-examples", type=_bounded(int, 1, MAX_ROW_ID), help="refuse to run on fewer pending examples")
    p.add_argument("--epochs", type=_bounded(int, 1, 1000))
    p.add_argument("--tag", "--scope", dest="tag", help="train the adapter of this scope (task tag)")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("adapters", help="list, inspect, roll back and prune adapter versions")
    sa = p.add_subparsers(dest="adapters_cmd", required=True)
    q = sa.add_parser("ls")
    q.add_argument("--json", action="store_true")
    q = sa.add_parser("show")
    q.add_argument("version", type=_bounded(int, 0, MAX_ROW_ID))
    q = sa.add_parser("rollback", help="serve an earlier version (default: the previous one; 0 = base model)")
    q.add_argument("version", type=_bounded(int, 0, MAX_ROW_ID), nargs="?")
    q.add_argument("--tag", help="scope of the adapter")
    q = sa.add_parser("prune", help="delete old adapter folders, keeping the newest N")
    q.add_argument("--keep", type=_bounded(int, 0, MAX_ROW_ID), required=True)
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("scopes", help="the task scopes traffic was grouped into: list, rename, merge, pin")
    sc = p.add_subparsers(dest="scopes_cmd", required=True)
    q = sc.add_parser("ls", help="scopes with their examples and serving adapter")
    q.add_argument("--json", action="store_true")
    q = sc.add_parser("rename", help="give a scope a better name (everywhere: examples, adapters, history)")
    q.add_argument("old")
    q.add_argument("new")
    q = sc.add_parser("merge", help="merge scope OLD into NEW (OLD's adapters stop serving)")
    q.add_argument("old")
    q.add_argument("new")
    q = sc.add_parser("pin", help="freeze a scope: no consolidation trains it; its serving adapter stays")
    q.add_argument("scope")
    q.add_argument("--reason", help="why, for whoever lists the scopes later")
    q = sc.add_parser("unpin", help="let a pinned scope learn again")
    q.add_argument("scope")
    p.set_defaults(func=cmd_scopes)

    p = sub.add_parser("schedule", help="background consolidation")
    s2 = p.add_subparsers(dest="schedule_cmd", required=True)
    q = s2.add_parser("status", help="next run and last result")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("calibrate", help="fit the routing threshold from logged System 2 interactions")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-system2-rate", type=_fraction, help="e.g. 0.3: send at most 30%% of queries to System 2")
    g.add_argument("--target-precision", type=_fraction, help="e.g. 0.9: System 1 right 90%% of the time it answers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", add_help=False, help="benchmarks that print numbers (agent bench --help)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # everything after `bench` is the benchmark's own command line
        args.bench_args = [*extra, *args.bench_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = args.log_level or DEFAULT_LOG_LEVEL.get(args.command, "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line per check
    try:
        config = _config(args)
        return args.func(args, config)
    except EXPECTED as exc:
        sys.stderr.write(f"agent: error: {describe(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("agent: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
