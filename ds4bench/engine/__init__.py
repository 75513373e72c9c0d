"""The DS4 engine: the model's configuration and file formats, GGUF files and synthetic weights,
the tokenizer, the forward pass with its run state, the heavy operations (the NumPy reference
and the CUDA kernels with their loader and decode graphs), the engine's options and greedy
generation. It imports nothing of the harness, the views or the CLI."""
