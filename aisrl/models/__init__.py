"""Models: the character tokenizer, tiny Llama checkpoints, the warm start, low-precision emulation (quant/)
and the precision mismatch measurement."""
