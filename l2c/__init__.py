"""l2c: LLM2CLIP as an embedding-cache pipeline.

Embed captions once with a frozen (caption-contrastive fine-tuned) LLM into a Parquet cache,
then train a vision encoder and a small text adapter on the cached vectors.
"""

__version__ = "0.1.0"

from l2c.cache import TextCache  # noqa: E402

__all__ = ["TextCache", "__version__"]
