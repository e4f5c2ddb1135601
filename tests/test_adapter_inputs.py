"""Under autocast, LoRA layers take their inputs as they come (stages/finetuning/model.py,
keep_adapter_inputs_as_they_come): no float32 copy of the activations that autocast would only cast back, and the
same loss and gradients as peft's default cast."""

import copy

import torch

from stages.common.params import parse_params
from tests.conftest import REPO, load_yaml


def test_adapter_inputs_stay_16_bit_under_autocast_with_the_gradients_of_the_float32_cast(tiny_model_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from stages.finetuning.model import attach_lora

    raw = copy.deepcopy(load_yaml(REPO / "params.yaml"))
    raw["model"]["name"] = "models/base/tiny"
    raw["train"]["precision"] = "bf16"
    raw["lora"]["dropout"] = 0.0  # both copies then compute the same numbers
    torch.manual_seed(0)
    as_they_come = attach_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), parse_params(raw)
    )
    cast = copy.deepcopy(as_they_come)
    for module in cast.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = True  # peft's default
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))

    def run(model: torch.nn.Module) -> tuple[set, float, dict]:
        seen = set()
        layers = [m.lora_A["default"] for m in model.modules() if isinstance(m, BaseTunerLayer)]
        handles = [layer.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype)) for layer in layers]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for handle in handles:
            handle.remove()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return seen, loss.item(), grads

    seen, loss, grads = run(as_they_come)
    seen_cast, loss_cast, grads_cast = run(cast)
    assert seen == {torch.bfloat16} and seen_cast == {torch.float32}
    assert {p.dtype for p in as_they_come.parameters() if p.requires_grad} == {torch.float32}  # optimizer's copy
    assert loss == loss_cast
    for name, grad in grads_cast.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
