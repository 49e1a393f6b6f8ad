"""Random initialisation of a model that exists only as a config, the same however it is built.

Users dry-run a cluster on a model's shape before downloading its weights, and benchmarks need
real shapes without real weights. Initialising an 8B model on one CPU first and then sharding
it takes minutes and a full copy in RAM; here every tensor's values depend only on the seed and
the tensor's name, so each FSDP rank can build its units directly on its own GPU
(``SeededInit`` as FSDP's ``param_init_fn``), and a model initialised whole in one process
holds exactly the same weights (tested).

Each module is initialised by the ``_init_weights`` of the innermost transformers model that
holds it (the scheme transformers uses for that architecture, rotary tables and position-id
buffers included; a LLaVA's CLIP image encoder is initialised by CLIP's, as transformers'
``initialize_weights`` dispatches) under a generator seeded from the name of the
module's first tensor; LoRA layers are then reset by peft's own ``reset_lora_parameters``
(A random, B zero), so a fresh adapter leaves the model's outputs unchanged.
"""

import contextlib
import zlib

import torch
from transformers import PreTrainedModel

from llm_finetune.adapters import base_model_of
from llm_finetune.quantization import (is_4bit, is_4bit_linear, pending_4bit_like,
                                       quantize_pending)


def _own_tensors(module: torch.nn.Module):
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is not None:
                yield table, name, tensor


def init_functions(base: torch.nn.Module) -> dict:
    """id(module) -> the ``_init_weights`` of the innermost ``PreTrainedModel`` holding it (or
    being it): a composite model's own scheme does not know its sub-models' modules."""
    owners = {}

    def visit(module: torch.nn.Module, init) -> None:
        init = module._init_weights if isinstance(module, PreTrainedModel) else init
        owners[id(module)] = init
        for child in module.children():
            visit(child, init)

    visit(base, base._init_weights)
    return owners


class SeededInit:
    """Materialise meta tensors on ``device`` and give them their seeded random values.

    Called with a module, it fills every meta tensor in that module's subtree (FSDP calls it
    once per wrap unit, with the unit's root first, so one unit is materialised at a time).
    Tensors shared by several modules (tied embeddings) stay shared.
    """

    def __init__(self, model: torch.nn.Module, seed: int, device: torch.device):
        self.seed = seed
        self.device = torch.device(device)
        base = base_model_of(model)
        self.init_weights = init_functions(base)  # the architectures' own init schemes
        self.base_init = base._init_weights  # a module added after this was built
        self.lora_init = {name: getattr(cfg, "init_lora_weights", True)
                          for name, cfg in getattr(model, "peft_config", {}).items()}
        # a tensor's canonical name: the first it has in the base model, without the
        # ".base_layer" that peft inserts, so adapters do not change the base's weights
        self.tensor_names, uses = {}, {}
        for name, tensor in [*base.named_parameters(remove_duplicate=False),
                             *base.named_buffers(remove_duplicate=False)]:
            self.tensor_names.setdefault(id(tensor), name.replace(".base_layer", ""))
            uses[id(tensor)] = uses.get(id(tensor), 0) + 1
        self.shared = {key for key, count in uses.items() if count > 1}
        self.module_names = {id(m): name for name, m in base.named_modules()}
        self.materialised = {}  # id(shared meta tensor) -> its real tensor
        # LoRA's A and B of one adapter are initialised together by their layer (peft's
        # reset_lora_parameters), also when FSDP wraps each as a unit of its own
        self.lora_pair = {}  # id(A or B) -> (LoRA layer, adapter name, [A, B])
        for module in base.modules():
            if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
                for adapter, lora_a in module.lora_A.items():
                    pair = [lora_a, module.lora_B[adapter]]
                    for leaf in pair:
                        self.lora_pair[id(leaf)] = (module, adapter, pair)

    @contextlib.contextmanager
    def _seeded(self, name: str):
        """A forked RNG seeded from ``name``: the training RNG stream is left untouched."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
            yield

    def _materialise(self, module: torch.nn.Module) -> torch.Tensor | None:
        """Give ``module`` real (uninitialised) tensors; return the meta tensor its seed comes
        from, or None when it had nothing on the meta device."""
        first = None
        for table, name, tensor in list(_own_tensors(module)):
            if not tensor.is_meta:
                continue
            first = tensor if first is None else first
            real = self.materialised.get(id(tensor))
            if real is None and is_4bit(tensor):
                real = pending_4bit_like(tensor, torch.empty(tensor.shape, dtype=tensor.dtype,
                                                             device=self.device))
            elif real is None:
                real = torch.empty_like(tensor, device=self.device)
                if isinstance(tensor, torch.nn.Parameter):
                    real = torch.nn.Parameter(real, requires_grad=tensor.requires_grad)
                if id(tensor) in self.shared:
                    self.materialised[id(tensor)] = real
            table[name] = real
        return first

    def __call__(self, root: torch.nn.Module) -> None:
        # 4-bit layers first, one at a time: each is initialised in full precision and
        # quantised at once, so a whole full-precision model never exists
        for module in root.modules():
            if is_4bit_linear(module) and module.weight.is_meta:
                self._fill([module])
        modules = list(root.modules())
        for module in list(modules):  # a LoRA A (or B) brings its partner along
            if id(module) in self.lora_pair:
                modules += [m for m in self.lora_pair[id(module)][2] if m not in modules]
        self._fill(modules)

    def _fill(self, modules: list[torch.nn.Module]) -> None:
        fresh = [(module, meta) for module in modules
                 if (meta := self._materialise(module)) is not None]
        lora_layers = {}
        for module, meta in fresh:
            with self._seeded(self.tensor_names[id(meta)]), torch.no_grad():
                self.init_weights.get(id(module), self.base_init)(module)
            quantize_pending(module)
            if id(module) in self.lora_pair:
                layer, adapter, _ = self.lora_pair[id(module)]
                lora_layers[(id(layer), adapter)] = (layer, adapter)
        for layer, adapter in lora_layers.values():
            with self._seeded(f"{self.module_names[id(layer)]}/lora/{adapter}"), torch.no_grad():
                layer.reset_lora_parameters(adapter, self.lora_init.get(adapter, True))
