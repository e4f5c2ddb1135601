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


def phi_lora_model() -> torch.nn.Module:
    """Phi's block (parallel attention and MLP, partial rotary, the layout the seed profile trains), LoRA as peft puts
    it on Phi, dropout off so eager and graphed passes compute the same numbers."""
    from peft import LoraConfig, get_peft_model
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        use_cache=False,
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "fc1", "fc2"], init_lora_weights=False
    )
    return get_peft_model(PhiForCausalLM(config), lora).cuda()


@pytest.mark.parametrize(("packed", "micro_batches"), [(True, 1), (True, 2), (False, 2)])
def test_eager_blocks_replayed_as_cuda_graphs_give_eager_gradients(packed, micro_batches):
    """`train.cuda_graphs` without compile (stages/finetuning/graphed.py): same gradients as eager blocks, for packed
    rows (positions restart per example, no attention mask) and padded ones, with and without accumulation; the
    evaluation (eval mode, no grad) runs the blocks' own code."""
    from stages.common.tokenized import Collator, TokenizedMeta
    from stages.finetuning.graphed import graph_blocks
    from stages.finetuning.packing import PackCollator

    eager = phi_lora_model()
    graphed = copy.deepcopy(eager)
    generator = torch.Generator().manual_seed(1)

    def batch() -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(4):
            length = int(torch.randint(4, 12, (1,), generator=generator))
            ids = torch.randint(1, 128, (length,), generator=generator).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
        meta = TokenizedMeta(0, 16, "completion", "packed" if packed else "max_length", "alpaca")
        collated = PackCollator(meta, 48)([rows]) if packed else Collator(meta)(rows)
        return {k: v.cuda() for k, v in collated.items()}

    graphed.train()
    eager.train()
    graph_blocks(graphed, batch(), "bf16")
    if micro_batches > 1:
        copy_graphed_gradients(graphed)
    for _ in range(3):
        batches = [batch() for _ in range(micro_batches)]
        grads = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            for b in batches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**b).loss
                loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=2e-2, atol=1e-4, msg=name)
    graphed.eval()
    with torch.no_grad():
        b = batch()
        torch.testing.assert_close(graphed(**b).logits, eager.eval()(**b).logits)
