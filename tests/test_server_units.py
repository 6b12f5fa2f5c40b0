"""The server's pure parts: which guard a request may ask for, chat messages, finish reasons,
and the model directory's `architectures`."""

import json

import pytest

from oc_engine.engine.prompts import check_messages, conversation_text
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig
from oc_engine.outputs import Completion, GuardReport, Timings
from oc_engine.server.guard_policy import GuardOverrideRefused, request_guard, weakenings
from oc_engine.server.protocol import ChatCompletionRequest, GuardRequest
from oc_engine.server.responses import ResponseBuilder, finish_reason

BASE = GuardConfig(every=4, deadline_s=5.0)


@pytest.mark.parametrize("asked, stream, weaker", [
    ({"input_check": True}, True, []),
    ({"every": 1, "uncertain": "block", "deadline_s": 1.0}, True, []),
    ({"final_check": True}, True, []),
    ({"max_held": 8}, True, []),
    ({"max_held": 1024}, True, ["max_held 1024 > 64"]),  # the operator bounds what is decoded unseen
    ({"every": 8}, True, ["every 8 > 4"]),
    ({"deadline_s": 60.0}, False, ["deadline_s 60.0 > 5.0"]),
    ({"final_check": False}, False, ["final_check: false", "hold_all: false"]),  # a whole answer: judged whole
    ({"final_check": False}, True, []),  # a stream has no final check by default
])
def test_a_request_may_only_tighten_the_guard(asked, stream, weaker):
    wanted = request_guard(BASE, GuardRequest(**asked), stream=stream, has_classifier=True, allow_override=True)
    assert weakenings(BASE, wanted, stream=stream, has_classifier=True) == weaker
    if weaker:
        with pytest.raises(GuardOverrideRefused, match="--allow-guard-override"):
            request_guard(BASE, GuardRequest(**asked), stream=stream, has_classifier=True, allow_override=False)


def test_turning_the_guard_off_is_an_override():
    with pytest.raises(GuardOverrideRefused):
        request_guard(BASE, GuardRequest(guard=False), stream=True, has_classifier=True, allow_override=False)
    assert request_guard(BASE, GuardRequest(guard=False), stream=True, has_classifier=True,
                         allow_override=True) is None
    with pytest.raises(OcEngineError, match="without a guard"):
        request_guard(None, GuardRequest(input_check=True), stream=True, has_classifier=True, allow_override=True)
    assert request_guard(BASE, None, stream=True, has_classifier=True, allow_override=False) is BASE


def test_stricter_when_the_server_is_strict():
    strict = GuardConfig(every=1, uncertain="block", input_check=True)
    for asked in ({"uncertain": "final"}, {"input_check": False}):
        with pytest.raises(GuardOverrideRefused):
            request_guard(strict, GuardRequest(**asked), stream=True, has_classifier=True, allow_override=False)


def test_chat_messages_are_checked_and_judged_whole():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert conversation_text(messages) == "Be brief.\n\nHi"
    assert conversation_text([{"role": "user", "content": "Hi"}]) == "Hi"  # as a plain prompt
    for bad, words in (([], "non-empty"), ([{"role": "robot", "content": "x"}], "role"),
                       ([{"role": "user", "content": 5}], "content must be text"),
                       ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message")):
        with pytest.raises(OcEngineError, match=words):
            check_messages(bad)


def test_text_parts_are_joined_and_echoed_assistant_fields_ignored():
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c", "refusal": None, "tool_calls": None},
        {"role": "user", "content": "d"}]})
    assert body.conversation() == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"},
                                   {"role": "user", "content": "d"}]


def test_a_tokenizer_without_a_chat_template_refuses_messages(tiny):
    from probe_helpers import plain_llm

    with pytest.raises(OcEngineError, match="no chat template"):
        plain_llm(tiny("llama")).prepare_request([{"role": "user", "content": "w5"}])


def _completion(finish, status=None, text="abc", refusal=None):
    guard = None if status is None else GuardReport(status=status, reason=None, pause_points=(1,), verdicts=(),
                                                    released_tokens=1)
    return Completion(request_id="r", prompt="p", prompt_token_ids=(1, 2), text=text, token_ids=(3,),
                      finish_reason=finish, refusal=refusal, guard=guard,
                      timings=Timings(0, 0, 0, None, 0), generated_tokens=5)


@pytest.mark.parametrize("finish, status, expected", [
    ("eos", None, "stop"), ("stop", "completed", "stop"), ("length", "completed", "length"),
    ("guard", "blocked", "content_filter"), ("eos", "blocked", "content_filter"), ("length", "held", "content_filter"),
    ("cancelled", "held", "cancelled"),  # a client that left while tokens were held
])
def test_finish_reasons_map_to_openai_values(finish, status, expected):
    assert finish_reason(_completion(finish, status)) == expected


def test_a_blocked_answer_ends_with_the_refusal_on_its_own_line():
    blocked = _completion("guard", "blocked", text="Sure, first", refusal="No.")
    assert blocked.shown_text == "Sure, first\nNo."
    assert _completion("guard", "blocked", text="", refusal="No.").shown_text == "No."
    body = ResponseBuilder("chatcmpl-1", "m", chat=True).full(blocked)
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}  # what was shown
    assert body["oc_engine"] == {"guarded": True, "released_tokens": 1, "status": "blocked", "refusal": "No."}
    detailed = ResponseBuilder("chatcmpl-1", "m", chat=True, details=True).full(blocked)["oc_engine"]
    assert detailed["generated_tokens"] == 5 and detailed["pause_points"] == [1] and "timings" in detailed


def test_a_converted_model_directory_gets_its_architecture(tmp_path):
    """Caches written before the fix have `"architectures": null`; they are completed in place."""
    from oc_engine.models.loading import CONVERTED_MARKER, ensure_converted_gguf

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": None, "hidden_size": 8}))
    (out / CONVERTED_MARKER).write_text("{}")
    assert ensure_converted_gguf(tmp_path / "unused.gguf", out) == out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 8
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", CONVERTED_MARKER])
