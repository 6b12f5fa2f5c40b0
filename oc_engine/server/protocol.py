"""The request bodies the server accepts: OpenAI's chat and legacy completions, validated strictly.

Types are strict (a string is not a number, 1.0 is not an integer) and unknown fields are
refused, as OpenAI's API refuses them. OpenAI fields that oc-engine does not implement are
accepted only at their neutral value (`logprobs: false`, penalties 0, ...), so a client that
sends its defaults works, and one that asks for more hears so. Extensions, as vLLM names them:
`top_k`, `ignore_eos`; and `oc_engine`, this request's guard settings (see `GuardRequest`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from oc_engine.errors import OcEngineError
from oc_engine.params import SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class GuardRequest(_Strict):
    """Per-request guard settings (`"oc_engine": {...}` in the body; `extra_body` with the openai
    client). Without `--allow-guard-override` a request may only make the guard stricter.
    `trace` is no policy: a streamed request's chunks then carry the probe's score per token,
    a guard detail that only a server started with `--guard-details` sends (the console's
    live trace)."""

    guard: StrictBool | None = None  # false: no guard for this request
    input_check: StrictBool | None = None
    final_check: StrictBool | None = None
    every: StrictInt | None = Field(None, ge=1)
    uncertain: Literal["final", "block"] | None = None
    max_held: StrictInt | None = Field(None, ge=1, le=65536)
    deadline_s: float | None = Field(None, gt=0)
    trace: StrictBool | None = None

    def policy_fields(self) -> dict:
        """The settings that change the guard's policy (all but `trace`)."""
        return self.model_dump(exclude_none=True, exclude={"trace"})


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # Extra fields are ignored: clients send back the assistant messages they received, with
    # `refusal: null`, `tool_calls: null`, `annotations: []` and the like.
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # -1 or 0: no limit (vLLM's convention)
    max_tokens: StrictInt | None = Field(None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=0, lt=2 ** 64)
    n: StrictInt = Field(1, ge=1, le=1)  # one choice per request
    ignore_eos: StrictBool = False
    oc_engine: GuardRequest | None = None
    # OpenAI fields accepted at their neutral value only (see `unsupported`).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: StrictInt | None = None
    user: StrictStr | None = None

    def unsupported(self) -> str | None:
        """The first field set to something oc-engine does not do, or None."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        if self.logit_bias:
            return "logit_bias"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.top_logprobs not in (None, 0):
            return "top_logprobs"
        return None

    def stop_list(self) -> tuple[str, ...]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP:
            raise OcEngineError(f"stop: at most {MAX_STOP} sequences, got {len(stop)}")
        if any(not s for s in stop):
            raise OcEngineError("stop: a stop sequence must be non-empty")
        return stop

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """OpenAI's defaults: temperature 1 and top_p 1 when not given (0 is greedy)."""
        top_k = self.top_k if self.top_k not in (None, -1, 0) else None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=None if self.top_p in (None, 1) else self.top_p, top_k=top_k, seed=self.seed,
                              stop=self.stop_list(), ignore_eos=self.ignore_eos)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return super().unsupported()

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1, le=1)
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        return super().unsupported()

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def single_prompt(self) -> str | list[int]:
        """One prompt: text or token ids (a list of several texts would be several choices)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise OcEngineError(f"prompt: one prompt per request, got a list of {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise OcEngineError("prompt must not be empty")
        return prompt
