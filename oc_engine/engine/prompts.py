"""Prompts in, token ids out: prompts files and chat-template rendering."""

from __future__ import annotations

from pathlib import Path

from oc_engine.errors import OcEngineError
from oc_engine.jsonl import iter_jsonl


def read_prompts_file(path: str | Path) -> list[str]:
    """JSONL with a string `prompt` field (`.jsonl`, or a file whose first line is an object),
    else one prompt per non-blank line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OcEngineError(f"cannot read prompts file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise OcEngineError(f"prompts file {path} is not UTF-8 text") from exc
    first = next((line for line in text.splitlines() if line.strip()), "")
    if path.suffix == ".jsonl" or first.lstrip().startswith("{"):
        prompts = []
        for number, row in iter_jsonl(path, required=("prompt",)):
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise OcEngineError(f"{path}:{number}: 'prompt' must be a non-empty string")
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OcEngineError(f"prompts file {path} has no prompts")
    return prompts


def render_prompt(tokenizer, prompt: str, chat_template: bool = True, response: str | None = None) -> list[int]:
    """Token ids for a user prompt, through the chat template when the tokenizer has one.

    With `response`, the assistant's answer follows the generation prompt (used to replay
    exchanges exactly as generation would have produced them). Qwen3's thinking is off.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False, enable_thinking=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if response:
            ids += tokenizer(response, add_special_tokens=False)["input_ids"]
        return ids
    text = prompt if not response else prompt + response
    return list(tokenizer(text)["input_ids"])


CHAT_ROLES = ("system", "developer", "user", "assistant")


def is_messages(prompt) -> bool:
    """A conversation: a non-empty list of {"role", "content"} dicts (OpenAI's chat messages)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def check_messages(messages) -> list[dict]:
    """The messages as plain {"role", "content": str} dicts; one clear error for the first bad one."""
    if not is_messages(messages):
        raise OcEngineError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise OcEngineError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise OcEngineError(f"messages[{i}].content must be text, got {type(content).__name__}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if out[-1]["role"] == "assistant":
        raise OcEngineError("the last message must not be the assistant's: there is nothing to answer")
    return out


def render_messages(tokenizer, messages) -> list[int]:
    """Token ids for a conversation through the tokenizer's chat template, ready for the answer."""
    messages = check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise OcEngineError("this model's tokenizer has no chat template: send raw text instead")
    from jinja2 import TemplateError

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                            enable_thinking=False)
    except TemplateError as exc:  # the template's raise_exception: e.g. two user turns in a row
        raise OcEngineError(f"this model's chat template refuses these messages: {exc}") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def conversation_text(messages) -> str:
    """What the input check judges: every turn's text, in order, the system prompt included (in
    windows when long: see `exchange_layout`). One user turn is exactly its text, as for a plain
    prompt; earlier turns stay in, so a request split over several turns (or hidden in a system
    prompt) is judged whole. Role names are not written in: the text is judged as text."""
    return "\n\n".join(m["content"] for m in check_messages(messages) if m["content"])


def last_request(messages) -> str:
    """The request an answer answers, which the answer checks judge it against: the last user
    turn (else, with no user turn, every turn's text). Never the system prompt alone: a verdict
    on the answer must not be a function of the deployment's instructions."""
    checked = check_messages(messages)
    users = [m["content"] for m in checked if m["role"] == "user"]
    return users[-1] if users else conversation_text(checked)
