"""Embed the s2agent learning loop in your own program: no server, a few lines.

    python examples/embed_in_app.py [--model default] [--db my-agent.db]

Loads the model (``default``: the embedded SmolLM2-135M-Instruct; the first run dequantizes it into
the cache, ~12 s), answers a few questions through the loop (System 1 answers; a question it is
unsure of goes to System 2, whose agreed answers join the training buffer), prints who answered each,
with System 1's confidence and the adapter that served, then the store's counts. Without ``--db`` the
store lives in a temporary folder and is gone afterwards; with it, the buffer grows from run to run
and ``agent --db my-agent.db consolidate`` distils it into an adapter that the next run serves.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from agent import Agent, AgentConfig

QUESTIONS = [
    ("What is the capital of France?", None),
    ("What is 47 + 38?", "arithmetic"),
    ("Take the last letters of the words in 'apple house' and concatenate them.", "last_letter"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default', a local model folder or a Hugging Face id")
    parser.add_argument("--db", help="SQLite file of the store (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = AgentConfig(model=args.model, db=args.db or str(Path(tmp) / "agent.db"))
        config.system2.methods_by_tag = {"arithmetic": "pal", "last_letter": "pal"}  # program-aided: exact answers
        config.kinds_by_tag = {"arithmetic": "number"}
        config.system2.samples = 4  # votes per System 2 run; the default 8 is steadier, and twice as slow

        with Agent(config) as agent:
            for question, tag in QUESTIONS:
                answer = agent.answer(question, tag=tag)
                confidence = f"{answer.confidence:.2f}" if answer.confidence is not None else "n/a"
                print(f"Q: {question}\nA: {answer.text.strip()}")
                print(f"   route {answer.route}, confidence {confidence}, adapter {answer.adapter_version or 'base'}"
                      + (f", method {answer.method}, votes {answer.votes}, kept for training {answer.accepted}"
                         if answer.method else "") + f", {answer.latency_ms:.0f} ms")
                if answer.error:
                    print(f"   (System 2 fell back to System 1: {answer.error})")
                print()
            stats = agent.stats()
            print("store: examples by status", json.dumps(stats["examples"]["by_status"]))
            print("store: interactions", json.dumps(stats["interactions"]))
            # Once enough examples are pending: agent.consolidate(), or agent.start_scheduler() to do it in the
            # background; the promoted adapter then serves the next agent.answer(...) without a restart.


if __name__ == "__main__":
    main()
