"""dllm-jax: jit-compiled decoding of diffusion language models in JAX."""

from dllm_jax.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
__version__ = "0.1.0"
