"""Module surgery the quantizer needs: swapping a submodule by dotted name, and undoing trial edits."""

from __future__ import annotations

from torch import Tensor, nn

from .linear import PrescaledLinear


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def snapshot(model: nn.Module, names: list[str]) -> dict[str, dict[str, Tensor]]:
    """Copies of the parameters and buffers of modules, to undo a trial scale or fake quantization."""
    return {n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()} for n in names}


def restore(model: nn.Module, saved: dict[str, dict[str, Tensor]]) -> None:
    """Puts modules back as `snapshot` saw them (a trial may have turned a Linear into a PrescaledLinear);
    also how a resumed quantize loads its finished blocks."""
    for name, state in saved.items():
        module = model.get_submodule(name)
        if "input_scale" not in state and isinstance(module, PrescaledLinear):
            module = plain_linear_like(module)
            replace_module(model, name, module)
        elif "input_scale" in state and not isinstance(module, PrescaledLinear):
            module = PrescaledLinear.from_linear(module)
            replace_module(model, name, module)
        module.load_state_dict(state)


def plain_linear_like(module: nn.Linear) -> nn.Linear:
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    return plain.to(module.weight.device, module.weight.dtype)

