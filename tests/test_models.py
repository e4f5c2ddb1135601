import torch
from transformers import PhiConfig, PhiForCausalLM
from transformers.activations import NewGELUActivation

from stages.common.models import fuse_activations


def test_python_gelu_is_swapped_for_the_fused_kernel_with_the_same_outputs():
    torch.manual_seed(0)
    config = PhiConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    model = PhiForCausalLM(config).eval()
    assert config.hidden_act == "gelu_new"
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fuse_activations(model) == 2
        after = model(input_ids=ids).logits
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
