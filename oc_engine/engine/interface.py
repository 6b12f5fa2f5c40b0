"""What a front end may use of an engine: the native `LLM` and the vLLM backend's `VllmLLM`
both implement `Engine`, and their `async_engine()` an `AsyncEngine`. The server and the
benches use nothing else, so a third backend needs only these.

Path of a request: the front end calls `prepare_request` (validate, tokenize, attach the
guard's monitor; no engine state), then `AsyncEngine.add` (queued for the engine's own
thread or loop) and reads `AsyncEngine.events` (one list per step, `Finished` last). The
native engine's thread calls `LLM.add_request` and `LLM.step`; vLLM drives its own loop.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator, Protocol, runtime_checkable

from oc_engine.engine.sequence import Sequence
from oc_engine.guard.policy import GuardConfig
from oc_engine.outputs import Completion, Event
from oc_engine.params import SamplingParams

Observer = Callable[[Sequence, list], None]  # called on the engine's thread with a request's events


@runtime_checkable
class AsyncEngine(Protocol):
    """An engine driven on its own thread or loop, for asyncio front ends."""

    error: BaseException | None  # what stopped it, if anything did

    def start(self) -> None: ...

    def shutdown(self, timeout: float | None = None) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def outstanding(self) -> int:
        """Requests accepted and not finished."""

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    def add(self, seq: Sequence) -> Any:
        """Accept a prepared request (on the event loop that will read its events); a handle."""

    def cancel(self, request_id: str) -> None: ...

    def events(self, request: Any) -> AsyncIterator[list[Event]]:
        """The request's events, one list per step, the last holding `Finished`."""


@runtime_checkable
class Engine(Protocol):
    """A loaded model with its guard, serving requests."""

    tokenizer: Any
    max_model_len: int  # prompt plus answer, in tokens
    guard_config: GuardConfig | None  # the default policy; None: unguarded
    classifier: Any  # the exchange classifier, or None
    probe: Any  # the activation probe (its `warn` and `pause` thresholds), or None

    @property
    def capacity(self) -> int:
        """Requests decoded together."""

    @property
    def vocab_size(self) -> int:
        """Token ids below this are valid input."""

    def prepare_request(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                        stream: bool = True, guard: GuardConfig | None | str = ...,
                        trace: bool = False) -> Sequence: ...

    def generate(self, prompts, params=None) -> list[Completion]: ...

    def stream(self, prompt, params: SamplingParams | None = None, *, trace: bool = False) -> Iterator[Event]: ...

    def warm_up(self) -> None: ...

    def async_engine(self, observers: tuple[Observer, ...] = ()) -> AsyncEngine: ...

    def close(self) -> None: ...
