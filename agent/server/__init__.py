"""The HTTP face of an :class:`~agent.loop.Agent`: OpenAI's wire format, so the official clients work unchanged.

Run it with ``agent serve`` (see :mod:`agent.cli`), or from Python::

    from agent import Agent, AgentConfig
    from agent.server import serve
    serve(Agent(AgentConfig.load("agent.toml")), host="127.0.0.1", port=8000)

then point any OpenAI client at it::

    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is 47 + 38?"}],
        extra_body={"s2agent": {"route": "auto", "tag": "arithmetic"}})

The server holds no decisions: it parses, validates, calls the ``Agent`` and formats the result. Which
request goes where:

- ``POST /v1/chat/completions`` with one user message (optionally after a system message equal to the
  agent's own ``system_prompt``) and ``n == 1`` (``Agent.learnable_query`` decides) goes through
  ``Agent.answer``: the learning loop (System 1,
  routing, System 2, the buffer). Any other shape (several turns, an assistant message, ``n > 1``, a system
  message of the caller's own) goes to ``Agent.complete``: plain System 1 with the serving adapter, nothing
  routed, nothing learned. A foreign system message is not sent through the loop because ``Agent.answer``
  serves and trains System 1 under one system prompt; dropping the caller's instruction silently would
  answer a different question.
- ``POST /v1/completions`` (a raw prompt, no chat template) is plain System 1 too.
- The model name picks nothing: every name in ``GET /v1/models`` (the base model, the serving adapters)
  and ``"default"`` are served by the agent with whatever adapter serves at that moment.
- ``s2agent`` in the request body (``extra_body`` in the OpenAI client) sets ``route``
  (``auto`` | ``system1`` | ``system2``), ``method`` (a System 2 method) and ``tag``; every response carries
  ``s2agent``: route, confidence, method, adapter_version, accepted, votes, interaction_id, tag.
- ``usage.completion_tokens`` counts every token generated for the answer; the System 2 share is
  ``usage.completion_tokens_details.reasoning_tokens``.
- ``GET /healthz`` (alive), ``GET /readyz`` (model loaded and store answering), ``GET /metrics``
  (Prometheus), and ``/admin/*`` (consolidate, adapters, rollback, stats) behind ``server.admin_token`` or an
  API key with the ``admin`` right.
- With API keys configured (:mod:`agent.auth`), ``/v1/*`` needs ``Authorization: Bearer KEY`` with the
  ``answer`` right; setting ``s2agent`` route, method or tag needs ``steer``; a key without ``teach`` is
  answered but its traffic never becomes training data. The key's name is passed to ``Agent.answer`` as the
  request's ``source`` (:mod:`~agent.server.auth`).

Model calls block, so they run in worker threads: concurrent requests reach the backend's micro-batcher
together and share forward passes.

The package is laid out as vLLM lays out its OpenAI entrypoints: :mod:`~agent.server.protocol` (request
bodies and the error shape), :mod:`~agent.server.errors` (what the agent raises, as HTTP errors),
:mod:`~agent.server.serving` (sampling, response objects, events), :mod:`~agent.server.routes` (the
routers; handlers read the agent from ``app.state``), :mod:`~agent.server.auth` (who is asking: 401, 403)
and :mod:`~agent.server.app` (:func:`create_app`, :func:`serve`). Handlers reach the store only through the
``Agent``.
"""

from agent.server.app import create_app, serve
from agent.server.serving import adapter_model_id

__all__ = ["adapter_model_id", "create_app", "serve"]
