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
