"""The vLLM general plugin (entry point `vllm.general_plugins`): registers the probe-augmented
architectures. vLLM calls it in every process it starts (the engine core, each worker), so the
registration reaches wherever a model is built. Registered lazily, by name: importing vLLM's
model code here would initialise the accelerator in the parent process."""

from __future__ import annotations

# Hugging Face architecture -> the probe-augmented architecture registered for it.
ARCHITECTURES = {
    "LlamaForCausalLM": "OcEngineProbeLlamaForCausalLM",
    "Qwen3ForCausalLM": "OcEngineProbeQwen3ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"oc_engine_vllm.models:{name}")
