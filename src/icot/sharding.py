"""Parameter sharding (FSDP2): each process holds 1/N of the weights, gradients and optimizer state.

The model is sharded with PyTorch's public `fully_shard`, one unit per decoder layer (the classes a
transformers model names in `_no_split_modules`, which is how Accelerate finds them too) and the rest
(embeddings, head, final norm, a method's modules) in the root unit, on the process group and device
Accelerate set up. Accelerate's own FSDP plugin is not used: it enables FSDP only for GPU process
groups, so the same code could not be proven on CPU processes (gloo) in CI.

What runs on the main process alone (validation, decoding, saving best/) gets the whole model: the
full state dict gathered to the main process into an unsharded copy kept on the CPU (`gathered`), in
the dtype the model computes in (bf16 under bf16-mixed: half the memory of the fp32 master weights,
which the checkpoints keep).
Checkpoints hold the sharded model and optimizer state through torch.distributed.checkpoint.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from icot.errors import UserError

FOLDER = "sharded"  # the checkpoint's subdirectory holding the sharded model and optimizer state


def layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The decoder layer classes: those a transformers model (or one inside a wrapper) names in its
    `_no_split_modules`, the blocks that must stay whole."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise UserError(f"fsdp: no decoder layer class found in {type(model).__name__} (its _no_split_modules names "
                        "none of its modules); expected a transformers model with decoder layers, or fsdp false")
    return classes


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype a sharded model's layers compute in: bf16 under bf16-mixed; None: the weights' own."""
    return torch.bfloat16 if precision == "bf16-mixed" else None


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16-mixed as FSDP does it: fp32 weights held sharded, gathered and computed in bf16, gradients
    reduced in fp32. fp32 and pure bf16 compute in the weights' own dtype."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class Sharded:
    """A model sharded over the processes, with an unsharded copy on the main process's CPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device, processes: int, main: bool, precision: str):
        classes = layer_classes(model)
        self.device, self.main = device, main
        # before sharding, an ordinary module, in the dtype the sharded model computes in
        self.whole = copy.deepcopy(model).to("cpu", compute_dtype(precision)) if main else None
        mesh = init_device_mesh(device.type, (processes,))
        policy = mixed_precision(precision)
        for module in list(model.modules()):
            if isinstance(module, classes):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        self.model = fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: every parameter not in a layer

    @contextmanager
    def gathered(self):
        """On every process: the full weights gathered to the main process, which gets its unsharded
        copy holding them, on the training device while the block runs; other processes get None."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            yield None
            return
        self.whole.load_state_dict(state)
        try:
            yield self.whole.to(self.device)
        finally:
            self.whole.cpu()

    def save(self, folder: Path, optimizer) -> None:
        """The sharded model and optimizer state, each process writing its shards (every process)."""
        model_state, optimizer_state = get_state_dict(self.model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / FOLDER))

    def load(self, folder: Path, optimizer) -> None:
        """What `save` wrote, into the sharded model and optimizer (every process)."""
        model_state, optimizer_state = get_state_dict(self.model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder / FOLDER))
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; an ordinary tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
