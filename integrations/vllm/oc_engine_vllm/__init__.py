"""oc-engine's probe and guard on vLLM.

- `plugin`: the vLLM general plugin that registers the probe-augmented architectures (`models`).
- `logits_processor`: each request's EMA, its score-table entries, and the hard stop.
- `score_table`: the shared-memory side channel from vLLM's worker to the caller.
- `VllmLLM` (`llm`): guarded generation over vLLM's `AsyncLLM`; `request_driver` is one
  request's guard loop; `async_engine` adapts it to oc-engine's server.

Importing this package imports neither vLLM nor torch: vLLM imports it in every process.
"""

__all__ = ["VllmLLM"]


def __getattr__(name):
    if name == "VllmLLM":
        from oc_engine_vllm.llm import VllmLLM

        return VllmLLM
    raise AttributeError(name)
