"""TokenSelect (arXiv 2411.02886) as an out-of-tree SGLang attention backend."""

from sglang_tokenselect.config import TokenSelectConfig

__all__ = ["TokenSelectConfig"]
__version__ = "0.1.0"
