"""Who is asking: a request's bearer key, the rights it carries, and the 401 and 403 answers in OpenAI's shape.

The keys themselves, their rights and the constant-time comparison live in :mod:`agent.auth`; this module
only reads the ``Authorization`` header and answers as OpenAI does (401 ``invalid_api_key`` without a valid
key, 403 ``permission_denied`` for a right the key lacks). Without API keys ``/v1/*`` is open, as before:
every request is the ``anonymous`` source with every right (the server refuses to start on a non-loopback
address that way unless told to, see :func:`agent.auth.check_exposure`).
"""

from __future__ import annotations

from fastapi import Request

from agent.auth import ALL_RIGHTS, ANONYMOUS, Caller, KeyRing
from agent.server.protocol import APIError, S2AgentOptions

_CHALLENGE = {"WWW-Authenticate": "Bearer"}
STEERING = (("route", "auto"), ("method", None), ("tag", None))
"""The ``s2agent`` options that need the ``steer`` right, with the value that leaves the choice to the agent."""


def key_ring(request: Request) -> KeyRing:
    return request.app.state.keys


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None when there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _denied(message: str, param: str | None = None) -> APIError:
    return APIError(403, message, type="permission_error", param=param, code="permission_denied")


async def authenticate(request: Request) -> Caller:
    """The ``/v1`` routes' gate: the caller a valid key (or, without keys, ``anonymous``) is, with the
    ``answer`` right; kept on ``request.state.caller`` for the handler and the access log."""
    keys = key_ring(request)
    if not keys.configured:
        caller = Caller(ANONYMOUS, ALL_RIGHTS)
    else:
        token = bearer_token(request)
        if token is None:
            raise APIError(401, "You didn't provide an API key. Send it in an Authorization header: "
                           "'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key", headers=_CHALLENGE)
        key = keys.authenticate(token)
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=_CHALLENGE)
        caller = Caller(key.name, key.rights)
    if not caller.may("answer"):
        raise _denied(f"the API key {caller.source!r} does not have the 'answer' right")
    request.state.caller = caller
    return caller


def caller_of(request: Request) -> Caller:
    """The caller :func:`authenticate` found for this request."""
    return request.state.caller


def require_steer(caller: Caller, options: S2AgentOptions) -> None:
    """Setting ``s2agent.route``, ``method`` or ``tag`` needs the ``steer`` right: forcing System 2 or a method
    is how a client chooses what the buffer learns, and a tag picks the adapter it is served and taught by."""
    if caller.may("steer"):
        return
    for name, default in STEERING:
        if getattr(options, name) != default:
            raise _denied(f"the API key {caller.source!r} may not set s2agent.{name}: that needs the 'steer' right",
                          param=f"s2agent.{name}")


def require_admin(request: Request) -> None:
    """The admin routes' gate: ``Authorization: Bearer`` the admin token or a key with the ``admin`` right;
    all refused when neither is configured."""
    keys = key_ring(request)
    if not keys.admin_enabled:
        raise APIError(403, "admin routes are disabled: set server.admin_token or S2AGENT_ADMIN_TOKEN, or give an "
                       "API key the admin right", type="permission_error", code="admin_disabled")
    token = bearer_token(request)
    if token is None:
        raise APIError(401, "admin routes need 'Authorization: Bearer <token>'", type="authentication_error",
                       code="missing_token", headers=_CHALLENGE)
    if keys.is_admin_token(token):
        return
    key = keys.authenticate(token)
    if key is None:
        raise APIError(403, "the admin token is wrong", type="permission_error", code="invalid_token")
    if "admin" not in key.rights:
        raise _denied(f"the API key {key.name!r} does not have the 'admin' right")
    request.state.caller = Caller(key.name, key.rights)
