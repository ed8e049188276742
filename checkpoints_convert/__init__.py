"""Convert Hugging Face PyTorch checkpoints (LLaDA, Dream, SDAR) into dllm_jax params."""
