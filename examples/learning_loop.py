"""The whole learning loop, in the open: System 2 teaches, System 1 learns, System 2 spend falls.

    python examples/learning_loop.py [--model default] [--queries 300] [--every 60] [--method pal]

A stream of last-letter-concatenation questions goes through ``Agent.answer``. System 1 (the base
model, then each promoted adapter) answers first; uncertain inputs go to System 2 (program-aided by
default: the model writes a tiny program, a sandbox runs it, 4 samples vote); consistent answers
join the buffer, tagged ``last_letter``. Every ``--every`` accepted examples the agent consolidates
them into a LoRA adapter scoped to that tag (other prompts keep the base model), gated against the
serving model, and hot-swaps it. After each round it prints System 1's
accuracy on held-out questions, the share of queries that needed System 2, and tokens per query.
It prints what really happens with the model you give it, improvement or not.
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent import Agent, AgentConfig
from bench.tasks import last_letter
from policies.answers import answers_match


def held_out_accuracy(agent: Agent, items) -> float:
    """System 1 alone (the serving adapter, greedy) on questions the loop never sees."""
    outputs = [c.text for c in agent.system1_batch([i.input for i in items], tag="last_letter", max_new_tokens=16)]
    return sum(answers_match(o, i.answer) for o, i in zip(outputs, items)) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--every", type=int, default=60, help="consolidate after this many accepted examples")
    parser.add_argument("--method", default="pal")
    args = parser.parse_args()

    task = last_letter(2, n_train=args.queries, n_eval=50, seed=0)
    with tempfile.TemporaryDirectory() as home:
        config = AgentConfig(model=args.model, db=str(Path(home) / "agent.db"), max_batch=32, batch_wait_ms=20)
        config.system2.method, config.system2.samples = args.method, 4
        config.consolidation.min_examples = 1
        with Agent(config) as agent:
            print(f"before learning: held-out System 1 accuracy {held_out_accuracy(agent, task.eval):.2f}")
            served = accepted = 0
            round_answers = []
            with ThreadPoolExecutor(8) as pool:  # concurrent queries share forward passes
                for answer in pool.map(lambda item: agent.answer(item.input, tag="last_letter"), task.train):
                    served += 1
                    round_answers.append(answer)
                    accepted += bool(answer.accepted)
                    if accepted >= args.every or served == len(task.train):
                        report = agent.consolidate(scope="last_letter")
                        share = sum(a.method is not None for a in round_answers) / len(round_answers)
                        tokens = sum(a.tokens for a in round_answers) / len(round_answers)
                        print(f"after {served:4d} queries: consolidation {report.status} "
                              f"({report.reason}); System 2 share {share:.2f}, {tokens:.0f} tokens/query; "
                              f"held-out System 1 accuracy {held_out_accuracy(agent, task.eval):.2f} "
                              f"(adapter {agent.serving_version('last_letter') or 'base'})")
                        accepted, round_answers = 0, []


if __name__ == "__main__":
    main()
