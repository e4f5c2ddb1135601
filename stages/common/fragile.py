"""Every call into another library's private or version-fragile surface, in one place: each says why it is needed
and which test fails if a new version of the library changes what it relies on. Upgrading transformers, peft,
torch or tqdm? Run those tests first.

Not movable here, and guarded the same way: stages/finetuning/trainer.py overrides `Trainer.evaluate` and so relies
on the Trainer's `accelerator`, `autocast_smart_context_manager`, `callback_handler` and `control` (guarded by
tests/test_trainer.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def limit_trainer_to_one_gpu(args: Any) -> None:
    """One process trains on one GPU. Left alone, the Trainer wraps the model in DataParallel over every visible GPU
    (its private `_n_gpu`), which doubles the rows per step on a 2-GPU machine (seen in bench: 157 steps, not 313).
    Guarded by tests/test_fragile.py::test_trainer_gpu_count_is_what_limit_trainer_to_one_gpu_sets."""
    args._n_gpu = min(args._n_gpu, 1)


def unlabel_dequantized_gguf(model: Any) -> None:
    """GGUF weights are dequantized to plain tensors on load; only the label says "quantized": the Trainer refuses to
    train a model so labelled, and a merged model saved with the label in its config.json is read back by transformers
    as a GGUF checkpoint and refused by llama.cpp's converter. Guarded by
    tests/test_fragile.py::test_a_gguf_base_is_trainable and tests/test_ship.py (the merged config)."""
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def mark_static_address(tensor: torch.Tensor) -> None:
    """A plain tensor attribute that never moves (4-bit block scales): unmarked, a CUDA-graphed block copies it into
    the graph's own memory on every replay (~380 copies per Phi-2 step). Guarded by tests/test_cuda_graphs.py (GPU)
    and tests/test_fragile.py::test_static_address_marking_exists (that the private API is still there)."""
    torch._dynamo.mark_static_address(tensor)


def swap_class(module: torch.nn.Module, cls: type) -> None:
    """Give one live layer another forward without copying its weights (bitsandbytes' 4-bit layers written in torch
    operations for torch.compile). Guarded by tests/test_fourbit.py."""
    module.__class__ = cls


def rename_base(model: Any, name: str) -> None:
    """What peft's model card records as the base (`name_or_path` in its tags, `config._name_or_path` in
    `base_model:`): the params' name, not the resolved path, which holds the virtual environment's absolute path and
    would make every checkpoint's bytes differ between machines. Guarded by tests/test_adapter_files.py."""
    model.name_or_path = model.config._name_or_path = name


def close_progress_bars() -> None:
    """Close the progress bars still open (tqdm's private registry), so an error line printed next starts a line of
    its own instead of following the bar's last update. Guarded by
    tests/test_trust_cli.py::test_a_diverging_run_stops_with_one_line_and_saves_no_adapter."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextmanager
def dvclive_never_inits_a_repo() -> Iterator[None]:
    """dvclive's `Live()` runs `dvc init` in the enclosing git repository when no DVC repository holds the working
    directory (a stage run by hand in a plain checkout or copy); a stage never writes outside its outs, so there
    `Live` is shown no repository (its module-level `get_dvc_repo`) and just writes its files. Guarded by
    tests/test_live.py::test_live_outside_a_dvc_repo_creates_none."""
    import dvclive.live
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        Repo.find_root()
    except NotDvcRepoError:
        pass
    else:
        yield
        return
    original = dvclive.live.get_dvc_repo
    dvclive.live.get_dvc_repo = lambda: None
    try:
        yield
    finally:
        dvclive.live.get_dvc_repo = original
