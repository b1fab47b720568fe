"""Low-precision rollout emulation: number formats (formats.py), schemes (schemes.py), checkpoint
rounding for the HF engine (checkpoint.py) and the vLLM quantization method (vllm_method.py)."""
