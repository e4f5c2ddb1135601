"""torch.compile for training: each transformer block compiled in place (4-bit layers rewritten in torch operations
first, stages/finetuning/fourbit.py), optionally replayed as CUDA graphs, with the gradient copies that CUDA graphs
need under gradient accumulation."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.finetuning.fourbit import inline_4bit_layers

log = logging.getLogger("pipeline")


def compile_layers(model: Any, cuda_graphs: bool = False) -> int:
    """Compile each transformer block in place (regional compilation): the blocks share one compiled graph, so
    compile time is that of one block, and the Trainer still sees the plain (quantized) model it accepts. The
    compiled code is cached on disk (torch's inductor cache), so a rerun on the same machine compiles in seconds.
    4-bit layers are rewritten in torch operations first (stages/finetuning/fourbit.py), so they compile too.
    Pays with fixed shapes (`tokenize.padding: max_length`); rows padded per batch make it recompile for shapes.
    `cuda_graphs`: each block's forward and backward are replayed as CUDA graphs (torch.compile's reduce-overhead
    mode), one launch instead of ~60 kernels per block: the step stops waiting on the host (GPU only)."""
    blocks = transformer_blocks(model)
    inlined = inline_4bit_layers(model)
    if inlined:
        log.info("%d 4-bit layers dequantised in torch operations, inside the compiled graphs", inlined)
    for block in blocks:
        block.compile(mode="reduce-overhead" if cuda_graphs else None)
    # Frozen embeddings give the first block an input that does not require grad, every later block one that does:
    # two graphs. Marking the embeddings' output (when grad is on; evaluation stays one graph too) makes it one.
    model.get_input_embeddings().register_forward_hook(_require_grad_when_training)
    return len(blocks)


def transformer_blocks(model: Any) -> list[torch.nn.Module]:
    """The longest list of same-typed modules: the transformer blocks."""
    return max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(c) for c in m}) == 1),
        key=len,
        default=[],
    )


def copy_graphed_gradients(model: Any) -> None:
    """For CUDA-graphed blocks under gradient accumulation. A gradient computed inside a graph lives in that graph's
    memory, which its next replay rewrites: accumulated as is (the first micro-batch's gradient becomes .grad), it
    would be overwritten by the next micro-batch (pytorch/pytorch#96693), so the accumulator gets a copy. Without
    accumulation the optimizer reads .grad before the next replay and nothing needs copying: the copies cost ~10 ms
    of host time per step (one per LoRA weight, 256 on Phi-2)."""
    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(torch.clone)


def _require_grad_when_training(module: Any, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        output.requires_grad_(True)
