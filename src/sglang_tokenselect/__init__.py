"""TokenSelect (arXiv 2411.02886) as an out-of-tree SGLang attention backend.

This package holds only what SGLang loads; the evaluation tools (task generators, the
transformers reference path, the bundled SmolLM2, the CPU demo) are in
``sglang_tokenselect_eval``.
"""

from sglang_tokenselect.config import TokenSelectConfig

__all__ = ["TokenSelectConfig"]
__version__ = "0.1.0"
