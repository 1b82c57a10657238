"""tpusft: post-training of LLMs in JAX, on TPU first, on GPU and CPU alike."""

__version__ = "0.1.0"
