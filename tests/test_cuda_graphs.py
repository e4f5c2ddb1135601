"""`train.cuda_graphs`: the compiled blocks replayed as CUDA graphs must give the gradients eager blocks give,
also accumulated over several micro-batches (a graph's next replay rewrites the memory its gradients live in).
Needs a CUDA GPU: skipped elsewhere, run on the GPU machine (README, GPU speed)."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.finetuning.compiled import compile_layers, copy_graphed_gradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def lora_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora).cuda()


def accumulated_gradients(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients after one backward per micro-batch, as the Trainer accumulates them between optimizer steps."""
    model.zero_grad(set_to_none=True)
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("micro_batches", [3, 1])
def test_graphed_blocks_give_the_gradients_eager_blocks_do(micro_batches):
    """With accumulation the gradients are copied (copy_graphed_gradients); without, they are read in place."""
    eager = lora_model()
    graphed = copy.deepcopy(eager)
    compile_layers(graphed, cuda_graphs=True)
    if micro_batches > 1:
        copy_graphed_gradients(graphed)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # optimizer steps: warm-up, recording, then replays
        batches = [torch.randint(0, 128, (2, 16), generator=generator).cuda() for _ in range(micro_batches)]
        want, got = accumulated_gradients(eager, batches), accumulated_gradients(graphed, batches)
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-5, msg=name)
