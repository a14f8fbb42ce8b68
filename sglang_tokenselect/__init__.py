"""TokenSelect (arXiv 2411.02886) as an out-of-tree SGLang attention backend.

This package holds only what SGLang loads; the evaluation tools (task generators, the
transformers reference path, the bundled SmolLM2, the CPU demo) are in
``sglang_tokenselect_eval``.
"""

import importlib.util as _util
import os as _os
import sys as _sys


def _map_source_subpackage(sub: str) -> None:
    """In a source checkout ``kernels/`` and ``server/`` sit beside this package (setuptools
    installs them as ``sglang_tokenselect.<sub>``); map them so the checkout imports like the
    installed package."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    source = _os.path.join(_os.path.dirname(here), sub)
    name = __name__ + "." + sub
    if name in _sys.modules or _os.path.isdir(_os.path.join(here, sub)):
        return
    if not _os.path.isfile(_os.path.join(source, "__init__.py")):
        return
    spec = _util.spec_from_file_location(
        name, _os.path.join(source, "__init__.py"), submodule_search_locations=[source]
    )
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_map_source_subpackage("kernels")
_map_source_subpackage("server")

from sglang_tokenselect.config import TokenSelectConfig  # noqa: E402

__all__ = ["TokenSelectConfig"]
__version__ = "0.1.0"
