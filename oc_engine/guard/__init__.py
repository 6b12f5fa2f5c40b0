"""The guard: the probe (`probe`, `probe_runtime`; its kernel in `oc_engine.kernels`), the
per-sequence policy (`policy`), the monitor that joins one request to the loop and the
classifier (`monitor`), and the exchange classifier (`classifier`, its input layout
`exchange_layout`, its shipped delta `classifier_delta`, its batcher `check_batcher`)."""
