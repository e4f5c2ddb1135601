"""Attention per example in packed rows, on CUDA: FlashAttention's variable-length kernel (torch.nn.attention.varlen)
computes each example against itself only, where SDPA computes the whole row against a block-diagonal mask. A packed
Phi-2 row of ~1,500 tokens holds 16 examples of ~95: the row-wide attention computes ~8x the scores it needs (the
bench's profile: ~15 ms of a ~100 ms step).

The packed collator (stages/finetuning/packing.py) passes each row's example bounds as `cu_seq_lens_q`/`_k`
(transformers' names for them, which every model hands to its attention function) in a tensor of one fixed length per
batch shape, and the row width as the longest a segment can be, so a CUDA graph recorded on one batch replays on the
next. Grouped key/value heads (Llama 3's 8 for 32 query heads) go to the kernel as they are where this torch takes
them (`enable_gqa`), repeated per query head where it does not. Anything else (evaluation's padded rows, float32
without autocast, dropout in attention) runs SDPA as before.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger("pipeline")

NAME = "sdpa_packed_varlen"  # the attention implementation this module registers with transformers
BOUND_TENSORS = ("cu_seq_lens_q", "cu_seq_lens_k")  # the keyword arguments that carry the example bounds
BOUND_LENGTHS = ("max_length_q", "max_length_k")


def segment_bounds(rows: list[list[int]], slots: int) -> torch.Tensor:
    """Cumulative bounds of each row's segments (lengths summing to the row width) over the rows laid end to end,
    `slots` segments per row: missing ones are empty (repeated bounds), so every batch gives one tensor length."""
    bounds = [0]
    for lengths in rows:
        if len(lengths) > slots:
            raise ValueError(f"a packed row of {len(lengths)} segments does not fit {slots} slots")
        for length in [*lengths, *[0] * (slots - len(lengths))]:
            bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32)


@functools.cache
def _kernel() -> tuple[Callable[..., torch.Tensor], dict[str, Any], bool]:
    """The variable-length kernel, how this torch says causal (a window (-1, 0) from torch 2.10, is_causal in 2.9),
    and whether it takes fewer key/value heads than query heads."""
    from torch.nn.attention.varlen import varlen_attn

    accepted = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in accepted


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query/key/value (rows, heads, width, head_dim) in, (rows, width, heads,
    head_dim) out."""
    bounds = kwargs.get(BOUND_TENSORS[0])
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    kernel_fits = query.is_cuda and dtype in (torch.float16, torch.bfloat16)
    if bounds is None or dropout > 0 or not kernel_fits:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, width, head_dim = query.shape
    varlen_attn, causal, takes_groups = _kernel()
    query, key, value, options = grouped_heads(query, key, value, takes_groups)

    def flat(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2).reshape(rows * width, states.shape[1], head_dim).to(dtype)

    longest = kwargs[BOUND_LENGTHS[0]]
    out = varlen_attn(
        flat(query), flat(key), flat(value), bounds, bounds, longest, longest, scale=scaling, **causal, **options
    )
    return out.view(rows, width, heads, head_dim), None


def grouped_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_takes_groups: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, bool]]:
    """Key/value heads shared by groups of query heads: passed as they are to a kernel that takes them, else each
    repeated for its group (the copy SDPA's own fallback makes)."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return query, key, value, {}
    if kernel_takes_groups:
        return query, key, value, {"enable_gqa": True}
    return query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), {}


def available(device: torch.device) -> bool:
    """Whether this torch has the variable-length kernel for `device` (CUDA, torch 2.9 or later)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def use_for_packed_rows(model: Any) -> bool:
    """Switch `model` (SDPA) to this attention when its device has the kernel; True when it did. Masks are still
    built as SDPA builds them (evaluation's padded rows need them; the packed rows' is ignored)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    if base.config._attn_implementation != "sdpa" or not available(base.device):
        return False
    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    base.set_attn_implementation(NAME)
    log.info("attention: each packed example against itself (FlashAttention variable-length), not the whole row")
    return True
