"""oc-engine: guarded generation for open-weight LLMs.

    from oc_engine import LLM, SamplingParams
    completions = LLM().generate(["Explain DNS"], SamplingParams(max_tokens=64))

A compiled, KV-cached decode loop with continuous batching, an activation probe scored inside
the step, and an exchange classifier asked when the probe pauses; plus the tools to train both.
Submodules load lazily, so `import oc_engine` stays fast.
"""

from oc_engine.errors import OcEngineError

__all__ = ["LLM", "EngineConfig", "GuardSetup", "UNGUARDED", "SamplingParams", "GuardConfig", "Completion", "GuardReport", "Verdict", "Timings",
           "TextReleased", "TokenScored", "Paused", "VerdictReceived", "Refused", "Finished",
           "OcEngineError"]
__version__ = "0.1.0"

_WHERE = {"LLM": "oc_engine.llm", **{name: "oc_engine.config" for name in ("EngineConfig", "GuardSetup", "UNGUARDED")},
          "SamplingParams": "oc_engine.params", "GuardConfig": "oc_engine.guard.policy",
          **{name: "oc_engine.outputs" for name in ("Completion", "GuardReport", "Verdict", "Timings", "TextReleased",
                                                    "TokenScored", "Paused", "VerdictReceived", "Refused", "Finished")}}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'oc_engine' has no attribute {name!r}")
