"""Length extrapolation: which RoPE a model applies, and whether FlashInfer can apply it in-kernel.

With ``--tokenselect-extrapolate`` the KV pool holds pre-RoPE keys and attention applies RoPE
inside FlashInfer (``pos_encoding_mode="ROPE_LLAMA"``) over positions in the attended list.
FlashInfer's in-kernel RoPE is plain rotate-half ("NeoX" / Llama) RoPE over the whole head,
with one ``rope_theta`` and one linear scale (position interpolation):
``angle(p, j) = (p / scale) * theta ** (-2j / D)``. Models whose RoPE is anything else
(llama3-style or YaRN scaling, dynamic NTK, partial rotary dims, interleaved GPT-J pairs,
multimodal RoPE) are refused by :func:`rope_spec_of_model` / :func:`rope_spec_of_hf_config`
with a one-line reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sglang_tokenselect.kernels import reference as ref

logger = logging.getLogger(__name__)

# SGLang rotary classes that FlashInfer's ROPE_LLAMA reproduces, and the reason for the others.
SUPPORTED_ROTARY_CLASSES = ("RotaryEmbedding", "LinearScalingRotaryEmbedding")
_CLASS_REASONS = {
    "Llama3RotaryEmbedding": "llama3-style RoPE scaling",
    "YaRNScalingRotaryEmbedding": "YaRN RoPE scaling",
    "YaRNScalingMRotaryEmbedding": "multimodal RoPE with YaRN scaling",
    "MRotaryEmbedding": "multimodal RoPE (mrope)",
    "Ernie4_5_VLRotaryEmbedding": "multimodal RoPE (mrope)",
    "DynamicNTKScalingRotaryEmbedding": "dynamic NTK RoPE scaling",
    "DynamicNTKAlphaRotaryEmbedding": "dynamic NTK RoPE scaling",
    "DeepseekScalingRotaryEmbedding": "DeepSeek YaRN RoPE scaling",
    "Phi3LongRoPEScaledRotaryEmbedding": "LongRoPE scaling",
    "DualChunkRotaryEmbedding": "dual-chunk RoPE",
    "FourierRotaryEmbedding": "Fourier RoPE",
    "Llama4VisionRotaryEmbedding": "2D vision RoPE",
    "Gemma4RotaryEmbedding": "Gemma 4 RoPE",
}
_HF_TYPE_REASONS = {
    "llama3": "llama3-style RoPE scaling",
    "yarn": "YaRN RoPE scaling",
    "dynamic": "dynamic NTK RoPE scaling",
    "longrope": "LongRoPE scaling",
    "su": "LongRoPE scaling",
    "deepseek_yarn": "DeepSeek YaRN RoPE scaling",
    "mrope": "multimodal RoPE (mrope)",
}


class UnsupportedRopeError(ValueError):
    """The model's RoPE cannot be applied by FlashInfer in-kernel (one-line reason)."""


class BudgetBeyondWindowError(ValueError):
    """The budget exceeds the trained context: attended-list positions would extrapolate."""


@dataclass(frozen=True)
class RopeSpec:
    """Plain rotate-half RoPE over the whole head, as FlashInfer's ``ROPE_LLAMA`` applies it.

    Attributes:
        head_dim: D, all of it rotated (pairs ``(j, j + D/2)``).
        theta: ``rope_theta`` (base).
        scale: linear position-interpolation factor (1.0: none); angle uses ``p / scale``.
        max_position: the model's trained context (``max_position_embeddings``), None if unknown.
    """

    head_dim: int
    theta: float
    scale: float = 1.0
    max_position: Optional[int] = None

    @property
    def params(self) -> tuple[float, float]:
        """``(theta, scale)``, the ``rope`` argument of the references in ``kernels/reference.py``."""
        return (self.theta, self.scale)

    def inv_freq(self, device=None) -> torch.Tensor:
        """[D/2] float32 ``theta ** (-2j / D)``, computed the way SGLang's RotaryEmbedding does."""
        return ref.rope_inv_freq_reference(self.head_dim, self.theta, device)

    def describe(self) -> str:
        return f"rope_theta={self.theta:g}, linear scale {self.scale:g}, head_dim {self.head_dim}"


def refuse(reason: str) -> UnsupportedRopeError:
    return UnsupportedRopeError(
        f"--tokenselect-extrapolate cannot serve this model: {reason} (FlashInfer applies only plain "
        "RoPE over the whole head, with one rope_theta and an optional linear scale, in-kernel)."
    )


def rotary_modules(model: torch.nn.Module) -> list:
    """The model's rotary-embedding modules (SGLang's ``RotaryEmbedding`` family and any module
    whose class name says rotary/RoPE)."""
    out = []
    for module in model.modules():
        name = type(module).__name__
        if "Rotary" in name or "RoPE" in name or (hasattr(module, "cos_sin_cache") and hasattr(module, "rotary_dim")):
            out.append(module)
    return out


def _spec_of_rotary_module(module: Any) -> RopeSpec:
    name = type(module).__name__
    if name not in SUPPORTED_ROTARY_CLASSES:
        raise refuse(f"{_CLASS_REASONS.get(name, 'unsupported RoPE')} ({name})")
    head, rotary = int(module.head_size), int(module.rotary_dim)
    if rotary != head:
        raise refuse(f"partial rotary dims (rotary_dim {rotary} of head_dim {head})")
    if not module.is_neox_style:
        raise refuse("interleaved (GPT-J style) RoPE pairs")
    scale = 1.0
    if name == "LinearScalingRotaryEmbedding":
        factors = list(module.scaling_factors)
        if len(factors) != 1:
            raise refuse(f"several linear RoPE scaling factors {factors}")
        scale = float(factors[0])
    return RopeSpec(head_dim=head, theta=float(module.base), scale=scale,
                    max_position=int(module.max_position_embeddings))


def rope_spec_of_model(model: torch.nn.Module) -> RopeSpec:
    """The one RoPE every attention layer of an SGLang model applies; raises
    UnsupportedRopeError (one line) when there is none, several, or one FlashInfer cannot apply."""
    modules = rotary_modules(model)
    if not modules:
        raise refuse("no rotary embedding found in the model")
    specs = {_spec_of_rotary_module(m) for m in modules}
    if len(specs) != 1:
        raise refuse(f"layers apply different RoPE ({', '.join(sorted(s.describe() for s in specs))})")
    return specs.pop()


def _rope_parameters(hf_config: Any) -> tuple[Optional[float], Optional[dict]]:
    """(rope_theta, scaling dict or None) across transformers 4 (``rope_theta``, ``rope_scaling``)
    and 5 (``rope_parameters``)."""
    params = getattr(hf_config, "rope_parameters", None)
    scaling = getattr(hf_config, "rope_scaling", None)
    theta = getattr(hf_config, "rope_theta", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default" or "mrope_section" in params:
            scaling = params
    return theta, scaling


def rope_spec_of_hf_config(hf_config: Any) -> RopeSpec:
    """The RoPE a Hugging Face config describes, if FlashInfer can apply it in-kernel; raises
    UnsupportedRopeError (one line) otherwise."""
    theta, scaling = _rope_parameters(hf_config)
    if theta is None:
        raise refuse("the model config has no rope_theta")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    partial = getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0
    if partial < 1.0:
        raise refuse(f"partial rotary dims (partial_rotary_factor {partial})")
    scale = 1.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if "mrope_section" in scaling:
            raise refuse("multimodal RoPE (mrope)")
        if kind == "linear":
            scale = float(scaling["factor"])
        elif kind != "default":
            raise refuse(f"{_HF_TYPE_REASONS.get(kind, 'RoPE scaling')} (rope_type {kind!r})")
    return RopeSpec(head_dim=int(head_dim), theta=float(theta), scale=scale,
                    max_position=getattr(hf_config, "max_position_embeddings", None))


def check_budget_within_window(spec: RopeSpec, budget: int) -> None:
    """Attended-list positions run up to the budget: it must fit the trained context."""
    if spec.max_position is not None and budget > spec.max_position:
        raise BudgetBeyondWindowError(
            f"--tokenselect-extrapolate needs the budget --tokenselect-n-init + --tokenselect-topk + "
            f"--tokenselect-n-local ({budget}) within the model's trained context ({spec.max_position} tokens)."
        )
