"""transformers integration: `HfInt4Config` and its quantizer, registered on import."""
from hf_int4.integration.config import HfInt4Config
from hf_int4.integration.quantizer import HfInt4Quantizer

__all__ = ["HfInt4Config", "HfInt4Quantizer"]
