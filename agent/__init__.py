"""s2agent: a continual-learning agent runtime that distils System 2 reasoning into System 1.

The public surface is small on purpose::

    from agent import Agent, AgentConfig

    with Agent(AgentConfig()) as agent:
        answer = agent.answer("What is 47 + 38?")
        print(answer.text, answer.route, answer.confidence)
"""

from agent.config import AgentConfig
from agent.loop import Agent, Answer

__all__ = ["Agent", "AgentConfig", "Answer"]
__version__ = "0.1.0"
