"""``agent bench ...`` and ``python -m bench ...``: wires the benchmark modules to the command line.

The runtime's CLI does not import this package until the ``bench`` command runs; it hands over the
arguments after ``bench`` and the configuration built from its global options (``--config``, ``--db``,
``--model``, ...). ``python -m bench`` builds that configuration itself from the same global options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from agent import AgentConfig


def build_parser(prog: str = "agent bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Benchmarks that print numbers.")
    sub = parser.add_subparsers(dest="bench_cmd", required=True)
    p = sub.add_parser("system1", help="load time, System 1 latency and tokens/s, loop overhead")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--no-first-load", action="store_true", help="skip the (slow) fresh dequantization")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serving", help="HTTP server tokens/s, requests/s and latency, batching on vs off")
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrent client counts")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--engine-requests", type=int, default=0,
                   help="> 0: also time to first token, 8 clients vs raw batch-8 generate, System 1 p90 under "
                        "2 PAL clients, with this many requests per measurement")
    p.add_argument("--url", help="drive the OpenAI-compatible server already running here instead of starting one")
    p.add_argument("--served-model", default="default", help="with --url: the model name to ask for")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("consolidation", help="training time, peak memory, adapter size, hot-swap latency")
    p.add_argument("--examples", type=int, default=100, help="synthetic correct examples seeded into the store")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--swaps", type=int, default=4, help="adapter switches timed for the hot-swap median")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("contention", help="System 1 latency with a consolidation (thread / niced child) or "
                                          "background System 2 running")
    p.add_argument("--conditions", default="none,thread,child,child-2t,inline,background",
                   help="comma-separated: none, thread, child, child-2t, child-nolend, child-nopause, inline, background")
    p.add_argument("--examples", type=int, default=100, help="additions imported before each consolidation")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--requests", type=int, default=30, help="System 1 requests timed per condition")
    p.add_argument("--repeats", type=int, default=2, help="passes over all conditions, interleaved")
    p.add_argument("--system2-queries", dest="system2_queries", type=int, default=10)
    p.add_argument("--gap", type=float, default=0.0,
                   help="seconds between timed System 1 requests (0: back to back; users who leave the engine idle "
                        "between requests)")
    p.add_argument("--no-finish", dest="finish", action="store_false",
                   help="stop each consolidation after the timed requests instead of timing the whole run")
    p.add_argument("--json", action="store_true")
    _add_paper(sub)
    p = sub.add_parser("abuse", help="attacks a client that reaches the port could try, against a real agent serve: "
                                     "tried N, held M")
    p.add_argument("--out", default="bench/out/abuse")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("soak", help="N agent serve --no-train replicas on one PostgreSQL database under C clients "
                                    "for D seconds: served, errors, p50/p99, nothing lost on the way to the store")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--postgres", default=os.environ.get("S2AGENT_TEST_POSTGRES_URL"),
                   help="PostgreSQL server URL; a fresh database is made and dropped (default: "
                        "$S2AGENT_TEST_POSTGRES_URL)")
    p.add_argument("--out", default="bench/out/soak")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("store", help="interaction rows and examples per second: one transaction each vs write-behind")
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--postgres", default=os.environ.get("S2AGENT_TEST_POSTGRES_URL"),
                   help="a PostgreSQL server URL to measure too, in a fresh database it drops afterwards "
                        "(default: $S2AGENT_TEST_POSTGRES_URL)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("knobs", help="LoRA rank, targets, learning rate, epochs, data: accuracy, retention, time")
    p.add_argument("--task", default="addition")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=50)
    p.add_argument("--only", help="comma-separated setting labels to run (default: all), e.g. 'defaults,rank 4'")
    p.add_argument("--general", action="store_true",
                   help="train the general (unscoped) adapter, where retention gates: the forgetting study")
    p.add_argument("--out", default="bench/out/knobs")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("general", help="correct examples imported untagged into the general adapter with the "
                                       "defaults: task accuracy on unseen items and general facts kept")
    p.add_argument("--task", default="addition")
    p.add_argument("--n", type=int, default=300, help="examples imported")
    p.add_argument("--n-eval", type=int, default=50, help="held-out items per column")
    p.add_argument("--fractions", help="also measure the trained adapter with its LoRA update scaled to these "
                                       "fractions, comma-separated (e.g. 0.1): what almost no learning costs")
    p.add_argument("--out", default="bench/out/general")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("system2", help="System 2 seconds, tokens and label quality for k = 1, 4, 8 samples")
    p.add_argument("--task", default="last_letter_2")
    p.add_argument("--method", default="pal")
    p.add_argument("--k", default="1,4,8", help="comma-separated sample counts")
    p.add_argument("--n", type=int, default=50, help="items")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("loop", help="learning curve of the live runtime (System 1 accuracy, System 2 share)")
    p.add_argument("--task", default="last_letter_2")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--round", type=int, default=100, help="queries between consolidations")
    p.add_argument("--method", default="pal", help="System 2 method (teacher:pal, teacher:direct... with --teacher)")
    _add_teacher(p)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replay", choices=("ratio", "all"),
                   help="consolidation.replay for this run (default: the configured one, ratio)")
    p.add_argument("--batch", choices=("each", "final", "none"), default="each",
                   help="measure batch distillation of the same examples after each round, the last, or never")
    p.add_argument("--out", default="bench/out/loop")
    p.add_argument("--json", action="store_true")
    _add_live(sub)
    _add_model_option(sub)
    return parser


def _numbers(text: str, option: str, parse: Callable[[str], float], ok: Callable[[float], bool], what: str) -> list:
    """``option``'s comma-separated values, each parsed and checked; an error naming the option otherwise."""
    try:
        values = [parse(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        raise SystemExit(f"{option} expects comma-separated {what}, got {text!r}")
    return values


def _positive_ints(text: str, option: str) -> list[int]:
    return _numbers(text, option, int, lambda v: v >= 1, "positive integers")


def _fractions(text: str, option: str) -> list[float]:
    return _numbers(text, option, float, lambda v: 0 <= v <= 1, "fractions between 0 and 1")


def _add_paper(sub) -> None:
    p = sub.add_parser("paper", help="System 1 / System 2 / distilled System 1 table, as in the paper")
    p.add_argument("--task", default="last_letter_2,addition",
                   help="comma-separated: last_letter_2, last_letter_3, coin_flip, addition, add_sub")
    p.add_argument("--data", help="eval JSONL of {input, answer} (instead of --task)")
    p.add_argument("--train-data", help="JSONL of {input}: unlabeled training inputs (labels come from System 2)")
    p.add_argument("--method", default="pal,cot", help="comma-separated System 2 methods (teacher:cot, "
                                                        "teacher:direct... with --teacher)")
    p.add_argument("--label-method", help="the method whose filtered answers are distilled (default: pal when "
                                          "listed, else the first method)")
    _add_teacher(p)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--n-eval-prompting", type=int, default=20, help="items for CoT/RaR rows")
    p.add_argument("--k", type=int, default=4, help="System 2 samples per query")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/paper")
    p.add_argument("--json", action="store_true")


def _add_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="System 2 teacher: an OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--teacher-model", help="the teacher's model name (with --teacher)")


def _use_teacher(args: argparse.Namespace, config: AgentConfig) -> None:
    """``--teacher URL --teacher-model M`` as ``[system2.teacher]`` for this run."""
    if args.teacher:
        config.system2.teacher.base_url = args.teacher
        config.system2.teacher.model = args.teacher_model or config.system2.teacher.model
        config.validate()


def _add_live(sub) -> None:
    p = sub.add_parser("live", help="agent serve with no configuration, learning by itself from mixed untagged traffic")
    p.add_argument("--queries", type=int, default=400, help="replayed queries in all")
    p.add_argument("--window", type=int, default=100, help="queries per measured window")
    p.add_argument("--clients", type=int, default=2, help="concurrent clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", help="family=share, comma-separated, of arithmetic, counting, sorting, last_letter, "
                                 "general, unanswerable (default: 0.35, 0.15, 0.1, 0.1, 0.2, 0.1)")
    p.add_argument("--probes", type=int, default=5, help="held-out System 1 probes per task family, after each window")
    p.add_argument("--facts", type=int, help="general facts asked at the start and the end for retention "
                                             "(default: all 32)")
    p.add_argument("--interval", type=float, default=0.0, metavar="SECONDS",
                   help="start replayed queries at least this far apart, e.g. 2.5 for System 2 in the background "
                        "(default 0: each client asks again as soon as it is answered)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one extra argument of agent serve, e.g. --server-arg=--min-pending=16 (repeatable)")
    p.add_argument("--serve-args", default="", metavar="ARGS",
                   help="extra arguments of agent serve in one string, e.g. \"--min-pending 16\"")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the server, for settings without a flag, e.g. "
                        "S2AGENT_SYSTEM2__SAMPLES=4 (repeatable)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the server's /readyz")
    p.add_argument("--keep-home", action="store_true", help="keep the server's data dir (store, adapters)")
    p.add_argument("--out", default="bench/out/live")
    p.add_argument("--json", action="store_true")


def _live_settings(args: argparse.Namespace):
    import shlex

    from bench import live

    env = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    try:
        mix = live.parse_mix(args.mix) if args.mix else dict(live.DEFAULT_MIX)
    except ValueError as exc:
        raise SystemExit(f"--mix: {exc}") from None
    if min(args.queries, args.window, args.clients) < 1 or min(args.probes, args.interval, args.facts or 0) < 0:
        raise SystemExit("--queries, --window and --clients must be positive, --probes, --interval and --facts "
                         "not negative")
    return live.LiveSettings(
        queries=args.queries, window=args.window, clients=args.clients, seed=args.seed, mix=mix, probes=args.probes,
        facts=args.facts, interval_s=args.interval,
        serve_args=[*args.server_arg, *shlex.split(args.serve_args)], server_env=env,
        request_timeout_s=args.request_timeout, ready_timeout_s=args.ready_timeout, keep_home=args.keep_home)


def _add_model_option(sub) -> None:
    """``agent bench paper --model X`` reads as naturally as ``agent --model X bench paper``: accept both."""
    for parser in sub.choices.values():
        parser.add_argument("--model", help="'default' (embedded SmolLM2-135M-Instruct), a local folder or a HF id")


def main(argv: Sequence[str] | None = None, config: AgentConfig | None = None, prog: str = "agent bench") -> int:
    """Run one benchmark; ``config`` comes from the runtime's CLI (``agent bench``), else from the
    environment and ``--model`` (``python -m bench``)."""
    args = build_parser(prog).parse_args(argv)
    config = config or AgentConfig.load()
    if args.model:
        config = dataclasses.replace(config, model=args.model)
    try:
        return run(args, config)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM during bench live: whatever it started is stopped by now
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


def run(args: argparse.Namespace, config: AgentConfig) -> int:
    if args.bench_cmd == "paper":
        from bench import paper

        _use_teacher(args, config)
        settings = paper.PaperSettings(
            label_method=args.label_method,
            tasks=args.task.split(","), methods=args.method.split(","), n_train=args.n_train, n_eval=args.n_eval,
            n_eval_prompting=args.n_eval_prompting, k=args.k, epochs=args.epochs, seed=args.seed,
            data=args.data, train_data=args.train_data,
        )
        result = paper.run(settings, config, Path(args.out))
        sys.stdout.write((json.dumps(result, indent=2) if args.json else paper.table(result["rows"])) + "\n")
        sys.stdout.write(f"wrote {args.out}/results.json and accuracy_vs_tokens.png in {result['seconds']:.0f} s\n")
        return 0
    if args.bench_cmd == "knobs":
        from bench import knobs

        only = [label.strip() for label in args.only.split(",")] if args.only else None
        result = knobs.run(config, args.task, args.n_train, args.n_eval, Path(args.out), only, args.general)
        sys.stdout.write((json.dumps(result, indent=2) if args.json else knobs.report(result)) + "\n")
        return 0
    if args.bench_cmd == "general":
        from bench import general

        fractions = _fractions(args.fractions, "--fractions") if args.fractions else None
        result = general.run(config, args.task, args.n, args.n_eval, Path(args.out), fractions)
        sys.stdout.write((json.dumps(result, indent=2) if args.json else general.report(result)) + "\n")
        return 0
    if args.bench_cmd == "system2":
        from bench import system2

        result = system2.run(config, args.task, args.method, _positive_ints(args.k, "--k"), args.n)
        sys.stdout.write((json.dumps(result, indent=2) if args.json else system2.report(result)) + "\n")
        return 0
    if args.bench_cmd == "loop":
        from bench import loop

        _use_teacher(args, config)
        result = loop.run(loop.LoopSettings(args.task, args.queries, args.round, args.method, args.n_eval, args.k,
                                            args.seed, args.epochs, args.batch, args.replay), config, Path(args.out))
        sys.stdout.write((json.dumps(result, indent=2) if args.json else loop.table(result)) + "\n")
        return 0
    if args.bench_cmd == "live":
        from bench import live

        result = live.run(_live_settings(args), config.model, Path(args.out), config.cache_dir)
        sys.stdout.write((json.dumps(result, indent=2, default=str) if args.json else live.report(result)) + "\n")
        sys.stdout.write(f"wrote {args.out}/results.json, live.png and server.log\n")
        return 0
    if args.bench_cmd == "system1":
        from bench import system1

        results = system1.run(config.model, args.new_tokens, args.repeats, config.threads,
                              measure_first_load=not args.no_first_load, dtype=config.dtype)
        sys.stdout.write((json.dumps(results, indent=2) if args.json else system1.report(results)) + "\n")
        return 0
    if args.bench_cmd == "serving":
        from bench import serving

        clients = _positive_ints(args.clients, "--clients")
        if args.url:
            results = serving.run_external(args.url.rstrip("/"), args.served_model, clients, args.requests_per_client,
                                           args.max_tokens)
        else:
            results = serving.run(config, clients, args.requests_per_client, args.max_tokens,
                                  engine_requests=args.engine_requests)
        sys.stdout.write((json.dumps(results, indent=2) if args.json else serving.report(results)) + "\n")
        return 0
    if args.bench_cmd == "contention":
        from bench import contention

        conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
        unknown = sorted(set(conditions) - set(contention.CONDITIONS))
        if unknown:
            raise SystemExit(f"--conditions: unknown {', '.join(unknown)}; "
                             f"choose from {', '.join(contention.CONDITIONS)}")

        def progress(row: dict) -> None:
            sys.stderr.write(f"[{row['condition']} #{row['repeat']}] " + json.dumps(
                {k: v for k, v in row.items() if not k.endswith("latencies")}, default=str) + "\n")

        results = contention.run(config, conditions, args.examples, args.epochs, args.requests, args.repeats,
                                 args.system2_queries, args.finish, progress=progress, gap=args.gap)
        sys.stdout.write((json.dumps(results, indent=2) if args.json else contention.report(results)) + "\n")
        return 0
    if args.bench_cmd == "abuse":
        from bench import abuse

        result = abuse.run(config.model, Path(args.out), config.cache_dir)
        sys.stdout.write((json.dumps(result, indent=2) if args.json else abuse.report(result)) + "\n")
        return 0 if result["held"] == result["tried"] else 1
    if args.bench_cmd == "soak":
        from bench import soak

        if not args.postgres:
            raise SystemExit("agent bench soak needs a PostgreSQL server: --postgres URL or $S2AGENT_TEST_POSTGRES_URL "
                             "(bash .ci/postgres.sh start prints one)")
        if min(args.replicas, args.clients, args.max_tokens, args.threads) < 1 or args.seconds <= 0:
            raise SystemExit("--replicas, --clients, --max-tokens, --threads and --seconds must be positive")
        settings = soak.SoakSettings(args.replicas, args.clients, args.seconds, args.max_tokens, args.threads)
        result = soak.run(settings, config.model, args.postgres, Path(args.out), config.cache_dir)
        sys.stdout.write((json.dumps(result, indent=2) if args.json else soak.report(result)) + "\n")
        return 0
    if args.bench_cmd == "store":
        from bench import store

        if min(args.rows, args.threads) < 1:
            raise SystemExit("--rows and --threads must be positive")
        results = store.run(args.rows, args.threads, args.postgres)
        sys.stdout.write((json.dumps(results, indent=2) if args.json else store.report(results)) + "\n")
        return 0
    if args.bench_cmd == "consolidation":
        from bench import consolidation

        results = consolidation.run(config, args.examples, args.epochs, args.swaps)
        sys.stdout.write((json.dumps(results, indent=2) if args.json else consolidation.report(results)) + "\n")
        return 0
    raise SystemExit(f"unknown bench command {args.bench_cmd}")
