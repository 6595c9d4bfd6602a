"""`ModelDims`: the numbers of a model that the memory plan depends on, and how they are read
off a model built on the meta device (`safegrpo_pl.plan.memory` does the arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a model that memory depends on.

    Attributes:
        num_layers: decoder layers of the language model.
        hidden_size: width of the language model (H).
        intermediate_size: width of its MLP (I).
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention).
        head_dim: width of one head.
        vocab_size: rows of the LM head.
        qk_norm: RMSNorm on queries and keys (Qwen3), which saves two more tensors per layer.
        total_params: every parameter of the policy (vision tower included, LoRA included).
        trainable_params: parameters that get gradients (LoRA adapters, or all).
        linear_params: weights of linear layers other than the LM head (what 4-bit quantises).
        layer_params: parameters of one decoder layer (what FSDP gathers at a time).
        vision_layers: blocks of the vision tower (0 for a text model).
        vision_hidden_size: its width.
        vision_intermediate_size: its MLP width.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    qk_norm: bool
    total_params: int
    trainable_params: int
    linear_params: int
    layer_params: int
    vision_layers: int = 0
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0


def model_dims(model: Any, config: Any) -> ModelDims:
    """Read `ModelDims` from a model (built on the meta device: no memory) and its config.

    Args:
        model: the policy as `load_policy` would build it (LoRA applied or not), on any device.
        config: its transformers config (a vision-language config or a text one).
    """
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    total = trainable = linear = 0
    head = _output_head(model)
    for name, param in model.named_parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        if param.ndim == 2 and "embed" not in name and param is not head and "lora_" not in name:
            linear += param.numel()
    layers = _decoder_layers(model)
    return ModelDims(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        qk_norm=any("q_norm" in n for n, _ in layers[0].named_parameters()),
        total_params=total,
        trainable_params=trainable,
        linear_params=linear,
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        vision_layers=getattr(vision, "depth", 0) if vision is not None else 0,
        vision_hidden_size=getattr(vision, "hidden_size", 0) if vision is not None else 0,
        vision_intermediate_size=getattr(vision, "intermediate_size", 0) if vision else 0,
    )


def _output_head(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return getattr(head, "weight", None)


def _decoder_layers(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers
