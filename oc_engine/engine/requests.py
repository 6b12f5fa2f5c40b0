"""Turning prompts into validated `Sequence`s: shared by every engine that serves oc-engine's
requests (the native `LLM`, and the vLLM backend in `integrations/vllm`).

A class using `PreparesRequests` sets the attributes declared on it below.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from oc_engine.config import DEFAULT
from oc_engine.engine.sequence import Sequence
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig
from oc_engine.params import SamplingParams

Prompt = str | list[int] | list[dict]  # text (the user turn), token ids, or chat messages


class PreparesRequests:
    tokenizer: Any
    chat_template: bool  # render text prompts as the chat template's user turn
    max_model_len: int
    probe: Any  # a Probe, or None (unguarded)
    guard_config: GuardConfig | None  # the default policy
    classifier: Any
    record_trace: bool
    _ids: Iterator[int]  # request id counter

    def prepare_request(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                        stream: bool = True, guard: GuardConfig | None | str = DEFAULT,
                        trace: bool = False) -> Sequence:
        """A validated, tokenized request that `add_request` can queue later; touches no engine
        state, so a server can do it on its own thread and answer a bad request at once.
        stream=False: nothing is shown before the end, so the final check is on by default.
        guard: this request's policy (a `GuardConfig`), None for no guard, or "default" (the LLM's).
        trace: its events include the probe's score per token (`TokenScored`); needs a guard."""
        (seq,) = self._sequences([prompt], params, keep_events=True, request_id=request_id, streaming=stream,
                                 guard=guard, trace=trace)
        return seq

    def _sequences(self, prompts, params, *, keep_events: bool, collect_taps: bool = False,
                   request_id: str | None = None, check_length: bool = True, streaming: bool | None = None,
                   guard: GuardConfig | None | str = DEFAULT, trace: bool = False) -> list[Sequence]:
        """Validated sequences for these prompts; an error for any bad one before any is queued."""
        from oc_engine.engine.prompts import conversation_text, is_messages, last_request, render_messages, render_prompt
        from oc_engine.engine.sampling import sequence_keys
        from oc_engine.engine.text_stream import TextStream
        from oc_engine.guard.monitor import SequenceMonitor

        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]  # one prompt: text, token ids or a conversation
        prompts = list(prompts)
        if not prompts:
            return []
        if params is None:
            params = SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts) or not all(isinstance(p, SamplingParams) for p in per_prompt):
            raise OcEngineError("give one SamplingParams, or one per prompt")
        policy = self.guard_config if isinstance(guard, str) and guard == DEFAULT else guard
        if policy is not None and (self.probe is None or not isinstance(policy, GuardConfig)):
            raise OcEngineError("a guard policy needs an LLM built with a probe" if self.probe is None
                                else f"guard must be a GuardConfig, None or 'default', got {guard!r}")
        if policy is not None and policy.input_check and getattr(self.classifier, "reads_states", False):
            from oc_engine.guard.state_reader import INPUT_CHECK_NEEDS_TEXT

            raise OcEngineError(INPUT_CHECK_NEEDS_TEXT)
        if trace and policy is None:
            raise OcEngineError("a trace of the probe's scores needs a guard (this request has none)")
        # Each prompt samples from its own random stream, keyed by its seed and its index here:
        # its tokens do not depend on its neighbours nor on how long it waited for a verdict.
        seeds = {p.seed for p in per_prompt}
        keys = {seed: sequence_keys(seed if seed is not None else random.SystemRandom().getrandbits(64),
                                    len(prompts)).tolist() for seed in seeds}
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            conversation = None  # what the input check judges, when more than the request
            if isinstance(prompt, str):
                ids, text = render_prompt(self.tokenizer, prompt, chat_template=self.chat_template), prompt
            elif is_messages(prompt):
                ids, text = render_messages(self.tokenizer, prompt), last_request(prompt)
                conversation = conversation_text(prompt)
            elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
                ids, text = list(prompt), None
            else:
                raise OcEngineError(f"prompt {i + 1} must be text, a list of token ids or a list of chat messages")
            if not ids:
                raise OcEngineError(f"prompt {i + 1} is empty after tokenization")
            if check_length and len(ids) >= self.max_model_len:
                raise OcEngineError(f"prompt {i + 1} has {len(ids)} tokens, too long for max_model_len "
                                    f"{self.max_model_len} (the prompt plus at least one new token)")
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            seq = Sequence(request_id=rid, prompt_ids=ids, params=p, key=keys[p.seed][i],
                           limit=max(1, min(p.max_tokens, self.max_model_len - len(ids))),
                           stream=TextStream(self.tokenizer, p.stop), prompt=text,
                           collect_taps=collect_taps, keep_events=keep_events)
            if policy is not None:
                guard_prompt = text if text is not None else self.tokenizer.decode(ids, skip_special_tokens=True)
                # A non-streaming call shows nothing before the end: its final check is on by default.
                config = policy.for_request(streaming=keep_events if streaming is None else streaming,
                                            has_classifier=self.classifier is not None)
                seq.guard = SequenceMonitor(seq, guard_prompt, config, self.classifier,
                                            record_trace=self.record_trace, conversation=conversation,
                                            score_events=trace)
            seqs.append(seq)
        return seqs

