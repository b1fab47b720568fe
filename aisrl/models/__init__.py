"""Models: the character tokenizer, tiny Llama checkpoints, FP8 weight emulation and the warm start."""
