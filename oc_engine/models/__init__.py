"""Models: loading a checkpoint (`loading`), weight-only quantization (`quantize`), and the
embedded assets and the defaults built from them (`embedded`, `defaults`)."""
