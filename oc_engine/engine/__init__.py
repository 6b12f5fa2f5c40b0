"""The decode loop: the engine loop (`llm_engine`), the scheduler and `Sequence`, the model
runner with its static cache, masks, sampling and runners, request preparation (`requests`,
`prompts`, `text_stream`), the one hardware switch (`accel`), and the interface every engine
implements (`interface`)."""
