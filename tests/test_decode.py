"""Greedy decoding over a static cache (stages/common/decode.py): the same tokens as `generate`, eagerly on any
device and replayed from a CUDA graph on a GPU."""

from __future__ import annotations

import pytest
import torch

from stages.common.decode import greedy

PROMPT, NEW = 9, 24


def left_padded_batch(vocab: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 5, 7 and 9 tokens, left-padded with token 0."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, PROMPT), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :2] = 0, 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def reference(model, ids, mask, eos: int) -> list[list[int]]:
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=eos
    )
    return [until_eos(row, eos) for row in out[:, PROMPT:].tolist()]


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module", params=["llama", "phi", "gpt2"])
def model(request):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    shape = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    torch.manual_seed(0)
    if request.param == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2)).eval()
    if request.param == "phi":
        return PhiForCausalLM(PhiConfig(**shape, num_attention_heads=4, partial_rotary_factor=0.5)).eval()
    # learned absolute positions: a padded row numbered from its first real token or not shows here
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4)).eval()


def test_eager_steps_give_generates_tokens_for_left_padded_prompts(model):
    ids, mask = left_padded_batch(model.config.vocab_size)
    never = model.config.vocab_size - 1
    ours = greedy(model, ids, mask, NEW, never, replay=False)
    assert ours.shape == (3, NEW)
    assert [until_eos(row, never) for row in ours.tolist()] == reference(model, ids, mask, never)


def test_left_padding_changes_nothing_and_the_loop_stops_once_every_row_has_ended(model):
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))

    def padded(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt after `pad` padding tokens, and its attention mask."""
        mask = (torch.arange(pad + 5) >= pad).long()[None]
        return torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt], 1), mask

    answers = [greedy(model, *padded(pad), NEW, -1, replay=False)[0].tolist() for pad in (0, 2, 4)]
    assert answers[0] == answers[1] == answers[2]
    eos = answers[0][2]
    stopped = greedy(model, *padded(2), NEW, eos, replay=False)
    assert stopped.shape[1] < NEW  # the row said eos by its third token
    assert until_eos(stopped[0].tolist(), eos) == until_eos(answers[0], eos)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_steps_give_the_eager_tokens_on_a_gpu(model):
    model = model.to("cuda")
    ids, mask = left_padded_batch(model.config.vocab_size, "cuda")
    never = model.config.vocab_size - 1
    replayed = greedy(model, ids, mask, NEW, never, replay=True)
    assert torch.equal(replayed, greedy(model, ids, mask, NEW, never, replay=False))
    assert [until_eos(row, never) for row in replayed.tolist()] == reference(model, ids, mask, never)
    model.to("cpu")
