"""oc-engine: guarded generation for open-weight LLMs.

A compiled, KV-cached decode loop that exposes a hidden-state tap for an activation
probe, plus the tools to train the probe and an exchange classifier.
"""

from oc_engine.errors import OcEngineError

__all__ = ["OcEngineError"]
__version__ = "0.1.0"
