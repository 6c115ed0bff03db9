"""Response ids that lead back to the engine holding the response, and only for its owner.

vLLM stores a response in the engine process that made it. The id a client sees is the engine's
id with the engine and an authenticator appended: `resp_8c1f…-<tag><mac>`, where `tag` names the
upstream (8 hex of a SHA-256 of its label) and `mac` is 16 hex of an HMAC-SHA256 over the
engine's id, the upstream and the owner (the API key's name, "" without auth). So:

- a retrieval, a cancellation or a `previous_response_id` goes to that engine and no other,
  without any state in the proxy (any worker, any proxy sharing the secret, after a restart);
- an id is useless with another key (its MAC does not verify: a 404, as for an unknown id, so
  it does not even say that the response exists), and cannot be edited to point elsewhere;
- an engine no longer configured, or down, is a clear error, never someone else's response.

The secret is `[server] response_id_secret` when set (proxies behind one load balancer share
it), else random per process: ids then stop working when the proxy restarts (the engine keeps
its store until it restarts).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re

from proxy.core.errors import InvalidRequest, NotFound
from proxy.core.pipeline import Handler, ProxyRequest, ProxyResponse
from proxy.upstream.model import ModelRoute

_SUFFIX = re.compile(r"[0-9a-f]{24}")


@functools.lru_cache(maxsize=1024)  # labels are the configured upstreams: a few, every answer
def _tag(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()[:8]


class ResponseIds:
    """Encodes and checks client-facing response ids for the upstreams of one runtime."""

    def __init__(self, routes: dict[str, ModelRoute], secret: bytes) -> None:
        self._secret = secret
        # tag -> (label, the models whose routes hold that upstream)
        self._labels: dict[str, tuple[str, list[str]]] = {}
        for name, route in routes.items():
            for upstream in route.upstreams:
                label, models = self._labels.setdefault(_tag(upstream.label), (upstream.label, []))
                if label == upstream.label and name not in models:
                    models.append(name)

    def _mac(self, orig: str, label: str, owner: str) -> str:
        message = f"{orig}\x00{label}\x00{owner}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:16]

    def encode(self, orig: str, label: str, owner: str) -> str:
        return f"{orig}-{_tag(label)}{self._mac(orig, label, owner)}"

    def decode(self, client_id: str, owner: str) -> tuple[str, str, list[str]] | None:
        """(the engine's id, the upstream's label, its models), or None if the id is not one
        this proxy gave `owner` (unknown, edited, another key's, or an upstream since removed)."""
        orig, _, suffix = client_id.rpartition("-")
        if not orig or not _SUFFIX.fullmatch(suffix):
            return None
        found = self._labels.get(suffix[:8])
        if found is None:
            return None
        label, models = found
        if not hmac.compare_digest(suffix[8:], self._mac(orig, label, owner)):
            return None
        return orig, label, models

    def held_by(self, request: ProxyRequest) -> list[str] | None:
        """The models whose upstream holds the response `request` continues; None when it
        continues none, or names one its caller was not given (the stage refuses it later)."""
        api = request.api
        if api.by_id or "response_ids" not in api.stages:
            return None
        previous = request.body.get("previous_response_id")
        if not isinstance(previous, str):
            return None
        found = self.decode(previous, request.key.name if request.key is not None else "")
        return found[2] if found is not None else None


def _not_found(client_id: str, param: str) -> NotFound:
    return NotFound(
        f"Response with id '{client_id}' not found.", param=param, code="response_not_found"
    )


class ResponseIdStage:
    """The built-in stage of the Responses routes (after the configured policies)."""

    def __init__(self, ids: ResponseIds) -> None:
        self._ids = ids

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        owner = request.key.name if request.key is not None else ""
        renames: list[tuple[str, str]] = []  # (the engine's id, the client's)
        if request.api.by_id:
            client_id = request.params["id"]
            found = self._ids.decode(client_id, owner)
            if found is None:
                raise _not_found(client_id, "response_id")
            orig, request.pin, models = found
            request.model = models[0]
            request.params = {"id": orig}
            renames.append((orig, client_id))
        else:
            previous = request.body.get("previous_response_id")
            if isinstance(previous, str):
                found = self._ids.decode(previous, owner)
                if found is None:
                    raise _not_found(previous, "previous_response_id")
                orig, label, models = found
                if request.model not in models:
                    raise InvalidRequest(
                        f"Response '{previous}' was made by another model than "
                        f"`{request.model}`; continue it with its own model.",
                        param="previous_response_id",
                    )
                request.body["previous_response_id"] = orig
                request.pin = label
                renames.append((orig, previous))
        response = await call_next(request)
        label = (request.served_by or "").partition(" ")[0]
        return self._rename(response, renames, label, owner)

    def _rename(
        self, response: ProxyResponse, renames: list[tuple[str, str]], label: str, owner: str
    ) -> ProxyResponse:
        state = response.state
        if response.stream is not None and state is not None:
            answer = state.answer_id
            if answer is not None and label:
                own = answer.decode("latin-1")
                if all(orig != own for orig, _ in renames):
                    renames.append((own, self._ids.encode(own, label, owner)))
            state.rewrite = _pairs(renames)
            return response
        body = response.body
        if response.status < 300 and label:
            found = _OWN_ID.search(body)
            if found is not None:
                own = found.group(1).decode("latin-1")
                if all(orig != own for orig, _ in renames):
                    renames.append((own, self._ids.encode(own, label, owner)))
        for old, new in _pairs(renames):
            body = body.replace(old, new)
        response.body = body
        return response


# The response's own id is the first `"id"` of its body (vLLM writes `id` first).
_OWN_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')


def _pairs(renames: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    # Quoted: an id is replaced as a whole JSON string (or as vLLM quotes one inside an error
    # message, 'resp_…'), never inside a longer one.
    return [
        (f"{q}{old}{q}".encode(), f"{q}{new}{q}".encode())
        for old, new in renames
        for q in ('"', "'")
    ]
