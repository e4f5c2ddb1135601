"""Greedy decoding over a static KV cache, each new token replayed from one recorded CUDA graph.

Decoding a handful of rows is bound by launching kernels, not by arithmetic: Phi-2 in 4-bit with a LoRA adapter
launches thousands of small kernels per token (~80 ms on an H200 through `generate`). With the cache, the mask and
the next token in fixed buffers, one token is the same kernels on the same addresses every time, so it is recorded
once and replayed. Same greedy arithmetic as `generate` (left padding, positions counted from each row's first real
token); the prompt is read eagerly.
"""

from __future__ import annotations

from typing import Any

import torch

CHECK_EVERY = 8  # tokens between looks at whether every row has ended (each look waits for the GPU)


def can_replay(model: Any) -> bool:
    """Graphs need CUDA, and the fixed mask below is the form SDPA takes (other attention kernels want their own)."""
    return model.device.type == "cuda" and model.config._attn_implementation == "sdpa"


@torch.no_grad()
def greedy(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    replay: bool,
) -> torch.Tensor:
    """The `max_new_tokens` greedy tokens after each left-padded prompt, (rows, max_new_tokens); a row that has ended
    keeps going (the caller cuts at the first eos), the loop stops once every row has. `replay`: record the step as
    a CUDA graph after one eager step (needs `can_replay`); otherwise every step runs eagerly."""
    from transformers import StaticCache

    rows, prompt = input_ids.shape
    total = prompt + max_new_tokens
    device = input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=total)
    seen = torch.zeros(rows, total, dtype=torch.bool, device=device)  # keys each row may attend to
    seen[:, :prompt] = attention_mask.bool()
    position = attention_mask.long().cumsum(-1) - 1
    position.masked_fill_(attention_mask == 0, 1)  # as generate numbers padding
    causal = torch.ones(prompt, total, dtype=torch.bool, device=device).tril()
    itself = torch.eye(prompt, total, dtype=torch.bool, device=device)  # a padding query sees itself: no empty row
    prompt_mask = (causal & seen[:, None, :]) | itself
    logits = model(
        input_ids=input_ids,
        attention_mask=prompt_mask[:, None],
        position_ids=position,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    position = position[:, -1:] + 1
    slot = torch.tensor([prompt], device=device)  # the cache slot the next token's key goes to
    ended = token[:, 0] == eos_token_id
    out = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    out[:, 0] = token[:, 0]

    def step() -> None:
        seen.index_fill_(1, slot, True)
        step_logits = model(
            input_ids=token, attention_mask=seen[:, None, None, :], position_ids=position, cache=cache, use_cache=True
        ).logits
        token.copy_(step_logits[:, -1].argmax(-1, keepdim=True))
        ended.logical_or_(token[:, 0] == eos_token_id)
        position.add_(1)
        slot.add_(1)

    graph = None
    for i in range(1, max_new_tokens):
        if i % CHECK_EVERY == 0 and bool(ended.all()):
            return out[:, :i]
        if graph is not None:
            graph.replay()
        else:
            step()
            if replay and i < max_new_tokens - 1:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # recorded, not run: the next replay is step i + 1
                    step()
        out[:, i] = token[:, 0]
    return out
