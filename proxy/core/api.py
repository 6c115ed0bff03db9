"""What a route family declares: its body shape and bounds, how usage is read, how it streams.

A family (`proxy.api.*`) is one object per API vLLM serves (chat completions, completions, ...).
The route table (`proxy.http.routes`) maps paths to families; everything between the client and
the engine asks the request's family instead of testing route names: the endpoint validates the
body with `read`, policies ask `max_tokens` and `prompt_estimate`, the sender asks `prepare` and
`usage`, and the stream relay feeds each complete block of events to `inspect`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

# How errors look on the route: OpenAI's body, with chunk or typed stream events, or Anthropic's
# (proxy.http.writer renders each).
ErrorShape = Literal["openai", "responses", "anthropic"]
# What a request may bind its output to (`Api.constraints`).
Constraint = Literal["tools", "json"]


class Usage(NamedTuple):
    """Tokens the engine reports for one request (None where the route does not say).

    A NamedTuple: one is made for every answer, and a frozen dataclass would pay a
    `object.__setattr__` per field."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


@dataclass(frozen=True, slots=True)
class Bounds:
    """Every list and multiplier a family reads has a bound (`[server]` keys of the same name)."""

    max_n: int = 16
    max_messages: int = 10_000
    max_prompts: int = 256
    max_sequences: int = 1024
    max_items: int = 2048


@dataclass(slots=True)
class StreamState:
    """What the relay learned from one stream's events so far (written by `Api.inspect`)."""

    usage: Usage | None = None
    # The route's terminal event was seen ([DONE], response.completed, message_stop ...): a
    # stream that ends without it was cut, whatever the transport said.
    finished: bool = False
    # Drop the usage-only event: the proxy asked for usage although the client did not.
    strip_usage: bool = False
    # The upstream's id of the answer, where the family reads one (a Responses `resp_...`).
    answer_id: bytes | None = None
    # Bytes replaced in every block relayed (ids the client knows under other names).
    rewrite: list[tuple[bytes, bytes]] | None = None


# The state of an answer that is not a stream: shared, since nothing writes it.
NO_STREAM = StreamState()


class Conversation:
    """A request's prompt as chat messages, for the truncate policy: `messages` is what is
    counted (`/tokenize` with the chat template, and `tools` in chat's shape), `turns` the
    groups of indexes into it that may be dropped together (oldest first), and
    `keep(indexes)` writes the body back holding only those messages. Families whose prompt is
    a conversation return one."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        turns: list[list[int]],
        *,
        tools: list[Any] | None = None,
    ) -> None:
        self.messages = messages
        self.turns = turns
        self.tools = tools

    def keep(self, indexes: list[int]) -> None:
        raise NotImplementedError


class Api:
    """Base of the route families; the defaults fit an OpenAI-shaped JSON route."""

    name: ClassVar[str]  # metrics label ("chat/completions"), also the log line's path
    # Where the engine serves it ("/v1/chat/completions"; `{name}` takes a path parameter).
    upstream_path: ClassVar[str]
    method: ClassVar[str] = "POST"  # how the engine is asked
    errors: ClassVar[ErrorShape] = "openai"
    # Policies that apply to this family; None: all (an embedding has no window to fit).
    policies: ClassVar[frozenset[str] | None] = None
    # Whether token reservations hold an output budget (an embedding generates nothing).
    generates: ClassVar[bool] = True
    # Built-in stages that run after the configured policies (names in the runtime's registry).
    stages: ClassVar[tuple[str, ...]] = ()
    # Query parameters passed to the engine (all others are dropped).
    query: ClassVar[frozenset[str]] = frozenset()
    # Response headers relayed besides content-type (e.g. an embedding's `metadata`).
    relay_headers: ClassVar[tuple[str, ...]] = ()
    # Read from the path, not the body: the route has no model until a stage finds it.
    by_id: ClassVar[bool] = False
    # The body field holding the prompt (what a context-length error names).
    prompt_field: ClassVar[str] = "messages"
    # Request fields vgate sets for the engine, where the engine's route accepts them (vLLM
    # 0.32): `cache_salt` (a tenant's own prefix cache, policies.auth) and `priority` (the key's,
    # on engines scheduling by priority, proxy.upstream.attempt). Off unless a family says so:
    # a field the engine does not know is at best ignored.
    cache_salt: ClassVar[bool] = False
    priority: ClassVar[bool] = False

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        """Check what the proxy relies on and every bound; returns (model, stream).

        Raises `InvalidRequest` naming the field. Fields the proxy does not read pass untouched.
        """
        raise NotImplementedError

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        """The output budget the client asked for (what a token reservation holds)."""
        return None

    def output_field(self, body: dict[str, Any]) -> str:
        """The body field holding the output budget (what clamping lowers)."""
        return "max_tokens"

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        """A rough prompt size in tokens, for reservations reconciled with real usage later."""
        return 1

    def prepare(self, body: dict[str, Any], stream: bool) -> StreamState:
        """Adjust the outbound body (e.g. ask a stream for usage); returns the stream's state."""
        return StreamState() if stream else NO_STREAM

    def usage(self, content: bytes) -> Usage | None:
        """The usage of a whole (non-streaming) answer."""
        return None

    def inspect(self, block: bytes, state: StreamState) -> bytes:
        """Look at a block of complete events; returns the block to relay (maybe without the
        usage event). Must be cheap: it runs for every chunk of every stream."""
        return block

    def peek(self, first: bytes, state: StreamState) -> None:
        """Look at the first chunk of a stream before anything is relayed (to find an id)."""

    def deterministic(self, body: dict[str, Any]) -> bool:
        """Whether the request's own parameters fix its answer (greedy or seeded sampling, or
        a route that does not sample): what the response cache keeps and serves by default."""
        return False

    def conversation(self, body: dict[str, Any]) -> Conversation | None:
        """The prompt as a conversation the truncate policy may fit, or None if it cannot."""
        return None

    def constraints(self, body: dict[str, Any]) -> tuple[Constraint, ...]:
        """What the request binds the output's form to: tool definitions ("tools"), a JSON
        format ("json"). Quantized weights get these wrong first (policies.route)."""
        return ()

    def single_prompt(self, body: dict[str, Any]) -> str | list[int] | None:
        """A prompt that is one text or one list of token ids (a completion's), else None."""
        return None
