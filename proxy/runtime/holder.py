"""The current Runtime of an app, swapped whole on reload."""

from __future__ import annotations

from proxy.runtime.runtime import Runtime


class RuntimeHolder:
    """The current Runtime; swapped whole on reload so a request sees one consistent config."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None

    def __call__(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the application has not started")
        return self._runtime

    def set(self, runtime: Runtime | None) -> None:
        self._runtime = runtime

    def peek(self) -> Runtime | None:
        """The current Runtime, or None outside the app's lifetime (for metrics scrapes)."""
        return self._runtime
