"""CLI commands beyond `generate` and `bench`, one module per family; `oc_engine.cli` registers them."""
