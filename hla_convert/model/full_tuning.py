"""Full fine-tuning of the converted blocks (stage 2 `train: full`) with one copy of the weights.

`train: full` trains every parameter of each transformer block that holds a converted attention
module (`full_tuning_parameters`): its attention and feed-forward linears, its norms and
modulation tables (Wan's scale_shift_table), layers given back to softmax included (their block
holds a converted module: stating it per block is simpler than per layer). Not trained: the
embeddings, the output head, blocks without a converted module, and the HLA parameters (those
train as always, in their own group), and no LoRA.

The teacher is still the base model: a `BaseStore` keeps the ORIGINAL values of the trained
weights on the host (CPU memory; a device never holds a second copy), and `show_base(model, True)`
copies them into the same Parameters (under no_grad, `copy_`, so optimizers and references stay
valid), keeping the trained values on the host meanwhile; `show_base(model, False)` copies the
trained values back. hla_convert.model.modes calls it: the "teacher" mode of a fully trained model
is the original base bit for bit, every other mode the trained model. One home for the swap,
used by stage 2 (the store is made when it starts), drift, selection and `load_adapter` (which
fills the store from the base it loads onto).

Store memory: one host copy of the trained weights (bf16 Wan2.1-14B, 40 blocks: ~27 GB), plus a
second one while teacher mode is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .layers import hla_layers

STORE_ATTR = "_hla_base_store"


def full_tuning_blocks(model: nn.Module, converted_names: Sequence[str] | None = None) -> list[str]:
    """The names of the blocks `train: full` trains: the parent of each converted attention module
    ("blocks.3.attn1" -> "blocks.3"), in model order. Empty when the model has none."""
    names = list(hla_layers(model)) if converted_names is None else list(converted_names)
    parents = {n.rsplit(".", 1)[0] for n in names if "." in n}
    return [n for n, _ in model.named_modules() if n in parents]


def full_tuning_parameters(model: nn.Module, blocks: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """The base parameters `train: full` trains, by full parameter name, in model order: every
    parameter of `blocks` (default full_tuning_blocks) except the HLA parameters and LoRA weights."""
    chosen = set(full_tuning_blocks(model) if blocks is None else blocks)
    out: dict[str, nn.Parameter] = {}
    for block in [n for n, _ in model.named_modules() if n in chosen]:
        for n, p in model.get_submodule(block).named_parameters(prefix=block):
            if ".hla." not in f".{n}." and ".lora_" not in n:
                out[n] = p
    return out


class BaseStore:
    """The original values of trained base weights, on the host; swaps them in and out.

    params: name -> the model's Parameter. original: name -> a CPU copy taken when the store was
    made (before training). While the originals are shown, `held` keeps the trained values (CPU)."""

    def __init__(self, params: dict[str, nn.Parameter], original: dict[str, torch.Tensor] | None = None):
        self.params = dict(params)
        if original is None:
            original = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        self.original = original
        self.held: dict[str, torch.Tensor] | None = None

    @property
    def showing_original(self) -> bool:
        return self.held is not None

    @torch.no_grad()
    def show(self, original: bool) -> None:
        """Put the original (True) or the trained (False) values into the Parameters; a no-op when
        they are already there."""
        if original and self.held is None:
            self.held = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.original[n])
        elif not original and self.held is not None:
            for n, p in self.params.items():
                p.copy_(self.held[n])
            self.held = None

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained values (CPU, the parameters' dtype), whichever are shown now."""
        if self.held is not None:
            return dict(self.held)
        return {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}


def base_store(model: nn.Module) -> BaseStore | None:
    """The model's store of original base weights, or None (nothing of the base is trained)."""
    store = model.__dict__.get(STORE_ATTR)
    return store if isinstance(store, BaseStore) else None


def attach_base_store(model: nn.Module, params: dict[str, nn.Parameter]) -> BaseStore:
    """Keep the current values of `params` as the originals (once: a store already there, made
    from the untrained base, is kept and extended by parameters it lacks). Call before training them."""
    store = base_store(model)
    if store is None:
        store = BaseStore(params)
        model.__dict__[STORE_ATTR] = store  # not a module attribute: no state_dict entry, no .to()
        return store
    if store.showing_original:
        raise RuntimeError("attach_base_store: the model is in teacher mode")
    new = {n: p for n, p in params.items() if n not in store.params}
    store.params |= new
    store.original |= {n: p.detach().to("cpu", copy=True) for n, p in new.items()}
    return store


def show_base(model: nn.Module, original: bool) -> None:
    """Show the original base weights (True: teacher mode) or the trained ones; no-op without a store."""
    store = base_store(model)
    if store is not None:
        store.show(original)


@contextlib.contextmanager
def original_weights(model: nn.Module) -> Iterator[nn.Module]:
    """The model with the original base weights shown inside (its fingerprint is the base's), then
    as it was; only the weights: the attention modes and LoRA are left alone."""
    was = showing_base(model)
    show_base(model, True)
    try:
        yield model
    finally:
        show_base(model, was)


def showing_base(model: nn.Module) -> bool:
    """Whether the original base weights are in the model now (teacher mode of a trained model)."""
    store = base_store(model)
    return store is not None and store.showing_original


__all__ = [
    "BaseStore",
    "attach_base_store",
    "base_store",
    "full_tuning_blocks",
    "full_tuning_parameters",
    "original_weights",
    "show_base",
    "showing_base",
]
