"""Probe-augmented vLLM models: vLLM's own Llama and Qwen3, which also score every token.

Selected by architecture name through `hf_overrides` (see `engine_args`):

    {"architectures": ["OcEngineProbeLlamaForCausalLM"], "oc_engine_probe": "/path/to/probe"}

The probe directory is oc-engine's own (`probe.safetensors`, `probe_config.json`), loaded and
checked against the weights vLLM loaded (the same fingerprint as the native engine: a probe
made for another model is refused at start-up, with oc-engine's message).

How the score travels, without a second pass and without knowing vLLM's batch layout:
1. `forward` asks the inner model for the probe's layers (`aux_hidden_state_layers`, vLLM's
   EAGLE-3 mechanism: the residual stream entering each layer, Hugging Face's
   `hidden_states[i]`), computes the score of every token [T] in fp32, and returns the final
   hidden states with two more columns [T, H + 2]: the score split into a high and a low part
   in the model's dtype (bf16 alone would keep 3 digits; the pair keeps about 5).
2. vLLM's model runner picks the rows it samples from (`hidden_states[logits_indices]`: the
   last scheduled token of each request, in the batch's order) and calls `compute_logits`,
   which splits the two columns off, hands the scores [num_reqs] to `step_scores` and
   computes the logits from the true hidden states.
3. The logits processor (`logits_processor`), run next in the same process, reads them row by
   row, updates each request's EMA and writes both to the caller's score table.
So the gather happens where vLLM gathers, outside any CUDA graph that captured `forward`, and
every tensor-parallel rank computes the same score from the same replicated hidden states.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.sequence import IntermediateTensors

from oc_engine.guard.probe import ModelFingerprint, load_probe
from oc_engine.kernels.probe_ema import score_of_logit
from oc_engine_vllm import step_scores

PROBE_KEY = "oc_engine_probe"  # the hf_overrides key naming the probe directory
EXTRA_COLUMNS = 2


class ProbeMixin:
    """Mixed in before a vLLM `...ForCausalLM`: `hf_architecture` is the Hugging Face class the
    probe's fingerprint names."""

    hf_architecture: str

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        directory = getattr(config, PROBE_KEY, None)
        if not directory:
            raise ValueError(f"{type(self).__name__} needs hf_overrides[{PROBE_KEY!r}]: an oc-engine probe directory")
        probe = load_probe(directory)  # OcEngineError (a ValueError's sibling) names the file on bad input
        self._probe = probe
        self.hidden_size = int(config.hidden_size)
        num_layers = int(config.num_hidden_layers)
        if probe.config.hidden_size != self.hidden_size:
            raise ValueError(f"probe expects hidden size {probe.config.hidden_size}, the model has {self.hidden_size}")
        # Hugging Face's hidden_states index: 0 the embeddings, i the output of layer i, and
        # num_layers the final norm's output (negative: from the end).
        layers = [layer if layer >= 0 else num_layers + 1 + layer for layer in probe.config.layers]
        if any(not 0 <= layer <= num_layers for layer in layers):
            raise ValueError(f"probe layers {probe.config.layers} are outside this model's 0..{num_layers}")
        self.probe_layers = tuple(layers)
        self.num_layers = num_layers
        aux = sorted({layer for layer in layers if layer < num_layers})
        self.model._set_aux_hidden_state_layers(tuple(aux))
        self._aux_position = {layer: i for i, layer in enumerate(aux)}
        self.register_buffer("probe_weight", probe.weight.float().clone(), persistent=False)  # [L, H]
        self.register_buffer("probe_bias", probe.bias.float().clone(), persistent=False)  # [1]

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """-> [T, H + 2]: the final hidden states and each token's probe score (see the module)."""
        output = self.model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if isinstance(output, IntermediateTensors):
            return output  # not the last pipeline stage: the score is computed there
        hidden, aux = output if isinstance(output, tuple) else (output, [])
        states = torch.stack([hidden if layer == self.num_layers else aux[self._aux_position[layer]]
                              for layer in self.probe_layers])  # [L, T, H]
        logit = torch.einsum("lth,lh->t", states.float(), self.probe_weight) + self.probe_bias
        score = score_of_logit(logit)  # [T] fp32, NaN where not finite
        high = score.to(hidden.dtype)
        low = (score - high.float()).to(hidden.dtype)
        return torch.cat([hidden, high[:, None], low[:, None]], dim=-1)

    def _split(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size + EXTRA_COLUMNS:
            return hidden  # not ours (a caller that computed its own hidden states): no scores
        step_scores.publish(hidden[:, -2].float() + hidden[:, -1].float())
        return hidden[:, :self.hidden_size]

    def compute_logits(self, hidden_states: torch.Tensor):
        return super().compute_logits(self._split(hidden_states))

    def compute_logits_local(self, hidden_states: torch.Tensor):
        return super().compute_logits_local(self._split(hidden_states))

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self._check_fingerprint()
        return loaded

    def _check_fingerprint(self) -> None:
        """The probe's model fingerprint against the weights vLLM loaded (the whole embedding:
        gathered across tensor-parallel ranks, without vLLM's vocabulary padding)."""
        from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather

        from oc_engine.errors import OcEngineError

        embedding = self.model.embed_tokens.weight.data
        if get_tensor_model_parallel_world_size() > 1:
            embedding = tensor_model_parallel_all_gather(embedding, dim=0)
        config = self.config
        embedding = embedding[:int(config.vocab_size)]
        actual = ModelFingerprint.from_parts(self.hf_architecture, config.get_text_config(), embedding)
        try:
            self._probe.check_fingerprint(actual)
        except OcEngineError as exc:
            raise ValueError(str(exc)) from None


class OcEngineProbeLlamaForCausalLM(ProbeMixin, LlamaForCausalLM):
    hf_architecture = "LlamaForCausalLM"


class OcEngineProbeQwen3ForCausalLM(ProbeMixin, Qwen3ForCausalLM):
    hf_architecture = "Qwen3ForCausalLM"
