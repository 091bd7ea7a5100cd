"""``agent bench ...``: wires the benchmark modules to the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_cmd", required=True)
    p = sub.add_parser("system1", help="load time, System 1 latency and tokens/s, loop overhead")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--no-first-load", action="store_true", help="skip the (slow) fresh dequantization")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, config) -> int:
    if args.bench_cmd == "system1":
        from bench import system1

        results = system1.run(config.model, args.new_tokens, args.repeats, config.threads,
                              measure_first_load=not args.no_first_load)
        sys.stdout.write((json.dumps(results, indent=2) if args.json else system1.report(results)) + "\n")
        return 0
    raise SystemExit(f"unknown bench command {args.bench_cmd}")
