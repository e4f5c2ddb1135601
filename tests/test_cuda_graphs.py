"""`train.cuda_graphs`: the compiled blocks replayed as CUDA graphs must give the gradients eager blocks give,
also accumulated over several micro-batches (a graph's next replay rewrites the memory its gradients live in), and
draw a new dropout mask at every replay; packed rows' attention per example must give the gradients of attention over
the row with a block-diagonal mask.
Needs a CUDA GPU: skipped elsewhere, run on the GPU machine (README, GPU speed)."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.finetuning.compiled import compile_layers, copy_graphed_gradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def lora_model(architecture: str = "llama", lora_dropout: float = 0.0) -> torch.nn.Module:
    """A tiny LoRA model, dropout off by default so two copies compute the same numbers. "phi": Phi's block (parallel
    attention and MLP, partial rotary, the layout the seed profile trains), LoRA where the seed puts it; "llama_gqa":
    Llama with one key/value head for two query heads, as Llama 3 groups them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    sizes = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
    if architecture == "phi":
        config = PhiConfig(**sizes, num_attention_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False)
        base, targets = PhiForCausalLM(config), ["q_proj", "v_proj", "fc1", "fc2"]
    else:
        groups = {"num_key_value_heads": 2} if architecture == "llama_gqa" else {}
        # no cache, as the pipeline loads it: with one, transformers skips the packed-row mask (its reference here)
        config = LlamaConfig(**sizes, num_attention_heads=4, use_cache=False, **groups)
        base, targets = LlamaForCausalLM(config), ["q_proj", "v_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets, init_lora_weights=False)
    return get_peft_model(base, lora).cuda()


def accumulated_gradients(
    model: torch.nn.Module, batches: list[dict], autocast: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Gradients after one backward per micro-batch (under `autocast` when given), as the Trainer accumulates them
    between optimizer steps."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
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
        ids = [torch.randint(0, 128, (2, 16), generator=generator).cuda() for _ in range(micro_batches)]
        batches = [{"input_ids": batch, "labels": batch} for batch in ids]
        want, got = accumulated_gradients(eager, batches), accumulated_gradients(graphed, batches)
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def phi_batch(packed: bool, generator: torch.Generator) -> dict:
    """Four examples of 4-11 tokens: packed into one row of 48 (with their bounds), or padded apart."""
    from stages.common.tokenized import Collator, TokenizedMeta
    from stages.finetuning.packing import PackCollator

    rows = []
    for _ in range(4):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        ids = torch.randint(1, 128, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    meta = TokenizedMeta(0, 16, "completion", "packed" if packed else "max_length", "alpaca")
    collated = PackCollator(meta, 48, slots=5)([rows]) if packed else Collator(meta)(rows)  # 4 examples + padding
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collated.items()}


@pytest.mark.parametrize(("packed", "micro_batches"), [(True, 1), (True, 2), (False, 2)])
def test_eager_blocks_replayed_as_cuda_graphs_give_eager_gradients(packed, micro_batches):
    """`train.cuda_graphs` without compile (stages/finetuning/graphed.py): same gradients as eager blocks, for packed
    rows (positions restart per example; the graphed model computes attention per example, packed_attention.py, the
    eager one over the row with transformers' block-diagonal mask) and padded ones, with and without accumulation;
    the evaluation (eval mode, no grad) runs the blocks' own code."""
    from stages.finetuning.graphed import graph_blocks
    from stages.finetuning.packed_attention import use_for_packed_rows

    eager = lora_model("phi")
    graphed = copy.deepcopy(eager)
    generator = torch.Generator().manual_seed(1)
    graphed.train()
    eager.train()
    if packed:
        assert use_for_packed_rows(graphed)
    graph_blocks(graphed, phi_batch(packed, generator), "bf16")
    if micro_batches > 1:
        copy_graphed_gradients(graphed)
    for _ in range(3):
        batches = [phi_batch(packed, generator) for _ in range(micro_batches)]
        want, got = (accumulated_gradients(m, batches, torch.bfloat16) for m in (eager, graphed))
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=2e-2, atol=1e-4, msg=name)
    graphed.eval()
    with torch.no_grad():
        b = phi_batch(packed, generator)
        torch.testing.assert_close(graphed(**b).logits, eager.eval()(**b).logits)


def test_graph_replays_draw_fresh_lora_dropout():
    """LoRA's dropout runs inside the recorded graphs: every replay must draw a new mask (CUDA graphs' RNG advances
    its offset per replay), as eager steps do; a mask frozen at recording would train with one fixed dropout."""
    from stages.finetuning.graphed import graph_blocks
    from stages.finetuning.packed_attention import use_for_packed_rows

    model = lora_model("phi", lora_dropout=0.5).train()
    assert use_for_packed_rows(model)  # as the seed profile trains: packed rows, attention per example
    generator = torch.Generator().manual_seed(3)
    batch = phi_batch(True, generator)
    graph_blocks(model, batch, "bf16")

    def loss() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            value = model(**batch).loss
        value.backward()
        return value.item()

    replays = [loss() for _ in range(4)]
    assert len(set(replays)) == len(replays), replays
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        without_dropout = model(**batch).loss.item()
    assert without_dropout not in replays


@pytest.mark.parametrize("architecture", ["phi", "llama_gqa"])
def test_attention_per_packed_example_gives_the_row_masked_loss_and_gradients(architecture):
    """packed_attention.py against SDPA over the whole row with the block-diagonal mask, eagerly: same loss, same
    gradients, in bf16 as training runs, grouped key/value heads included; padded rows (evaluation's) still run SDPA
    with their mask."""
    from stages.finetuning.packed_attention import NAME, use_for_packed_rows

    row_masked = lora_model(architecture)
    per_example = copy.deepcopy(row_masked)
    assert use_for_packed_rows(per_example) and per_example.config._attn_implementation == NAME
    generator = torch.Generator().manual_seed(2)
    batches = [phi_batch(True, generator) for _ in range(2)]
    want, got = (accumulated_gradients(m, batches, torch.bfloat16) for m in (row_masked, per_example))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=2e-2, atol=1e-4, msg=name)
    padded = phi_batch(False, generator)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(per_example(**padded).loss, row_masked(**padded).loss)
