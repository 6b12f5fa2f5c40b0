"""Benchmarks behind `oc-engine bench`: one module per bench (`decode`, `continuous`, `guard`,
`serve`, `quantized`, `quality`, `classifier`, `input_check`, `long_context`) and the
llama.cpp baseline (`llama_cpp`). Each returns a JSON-ready report; the CLI prints it."""
