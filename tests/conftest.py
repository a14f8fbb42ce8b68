"""Without a GPU, Triton kernels run through Triton's interpreter (set before any import).
Shared fixtures: ``tiny_model``."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import numpy as np
    import triton.runtime.interpreter as _interp

    def _patch_interpreter_index() -> None:
        """Triton 3.6's interpreter turns scalars into 1-element arrays, and ``int()`` of those
        fails under numpy 2 ("only 0-dimensional arrays ..."), which breaks ``range(0, n)``
        with a loaded bound. Make ``__index__`` read the single element instead."""
        original = _interp._patch_lang_tensor

        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        if not getattr(original, "_tokenselect_patched", False):
            patched._tokenselect_patched = True
            _interp._patch_lang_tensor = patched

    _patch_interpreter_index()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A config.json is all SGLang's argument resolution reads of a model."""
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "head_dim": 16,
    }))
    return str(path)
