"""The compiled 4-bit path: bitsandbytes' layers rewritten in torch operations must give bitsandbytes' exact
numbers, and compile into one graph for all the blocks. bitsandbytes' CPU kernels are the reference."""

import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from stages.finetuning import fourbit  # noqa: E402
from stages.finetuning.fourbit import code_table, dequantize, inline_4bit_layers  # noqa: E402


def quantized_linear(quant_type, dtype=torch.bfloat16, nested=False, seed=0, features=(256, 192)):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(*features).to(dtype)
    layer = bnb.nn.Linear4bit(
        *features, compute_dtype=dtype, quant_type=quant_type, compress_statistics=nested, device="meta"
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data, requires_grad=False, quant_type=quant_type, compress_statistics=nested
    )
    layer.bias = torch.nn.Parameter(dense.bias.data, requires_grad=False)
    return layer.to("cpu")  # quantizes the weight


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_dequantisation_is_bitsandbytes_bit_for_bit(quant_type, dtype):
    layer = quantized_linear(quant_type, dtype)
    state = layer.weight.quant_state
    expected = bnb.functional.dequantize_4bit(layer.weight.data, state)
    assert torch.equal(dequantize(layer.weight, state, code_table(quant_type, torch.device("cpu"))), expected)


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_compiled_swapped_layer_gives_the_same_outputs_and_input_gradients(quant_type):
    layer = quantized_linear(quant_type)
    x = torch.randn(3, 7, 256, requires_grad=True)  # float32 input, bfloat16 compute, as under autocast
    expected = layer(x)
    expected.pow(2).sum().backward()
    expected_grad, x.grad = x.grad, None

    assert inline_4bit_layers(torch.nn.Sequential(layer)) == 1
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # traced: the torch path, no graph break
    got = compiled(x)
    got.pow(2).sum().backward()
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)
    assert torch.equal(x.grad, expected_grad)
    assert isinstance(layer, bnb.nn.Linear4bit)  # peft's LoRA wrappers still recognise it
    assert inline_4bit_layers(torch.nn.Sequential(layer)) == 0  # swapping twice changes nothing


def test_all_blocks_share_one_compiled_graph():
    from torch._dynamo.testing import CompileCounter

    class Block(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.linear = quantized_linear("fp4", seed=seed, features=(64, 64))

        def forward(self, x):
            return torch.nn.functional.gelu(self.linear(x)) + x

    blocks = torch.nn.ModuleList(Block(seed) for seed in range(3))
    x = torch.randn(2, 64)
    expected = x
    for block in blocks:
        expected = block(expected)
    assert inline_4bit_layers(blocks) == 3
    counter = CompileCounter()
    torch._dynamo.reset()
    for block in blocks:
        block.compile(backend=counter)
    got = x
    for block in blocks:
        got = block(got)
    assert counter.frame_count == 1  # one graph, reused by the three blocks
    assert torch.equal(got, expected)


def test_double_quantised_layers_are_left_to_bitsandbytes():
    layer = quantized_linear("nf4", nested=True)
    assert inline_4bit_layers(torch.nn.Sequential(layer)) == 0
    assert type(layer) is bnb.nn.Linear4bit


def test_a_dequantisation_that_does_not_match_changes_nothing(monkeypatch, caplog):
    layer = quantized_linear("fp4")
    monkeypatch.setattr(fourbit, "code_table", lambda quant_type, device: torch.linspace(-1, 1, 16))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert inline_4bit_layers(torch.nn.Sequential(layer)) == 0
    assert type(layer) is bnb.nn.Linear4bit
    assert "does not match" in caplog.text


def test_backward_keeps_the_4bit_weight_not_a_16bit_copy():
    layer = quantized_linear("fp4", features=(512, 512))
    inline_4bit_layers(torch.nn.Sequential(layer))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compiled(torch.randn(4, 512, requires_grad=True))
    assert any(t.dtype == torch.uint8 for t in saved)  # the packed weight: dequantised again in backward
    assert not any(t.numel() >= 512 * 512 and t.is_floating_point() for t in saved)
