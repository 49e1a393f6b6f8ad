"""Random initialisation of a model that exists only as a config, the same however it is built.

Users dry-run a cluster on a model's shape before downloading its weights, and benchmarks need
real shapes without real weights. Initialising an 8B model on one CPU first and then sharding
it takes minutes and a full copy in RAM; here every tensor's values depend only on the seed and
the tensor's name, so each FSDP rank can build its units directly on its own GPU
(``SeededInit`` as FSDP's ``param_init_fn``), and a model initialised whole in one process
holds exactly the same weights (tested).

Each module is initialised by the model's own ``_init_weights`` (the scheme transformers uses
for that architecture, rotary tables included) under a generator seeded from the name of the
module's first tensor; LoRA layers are then reset by peft's own ``reset_lora_parameters``
(A random, B zero), so a fresh adapter leaves the model's outputs unchanged.
"""

import contextlib
import zlib

import torch


def _own_tensors(module: torch.nn.Module):
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is not None:
                yield table, name, tensor


class SeededInit:
    """Materialise meta tensors on ``device`` and give them their seeded random values.

    Called with a module, it fills every meta tensor in that module's subtree (FSDP calls it
    once per wrap unit, with the unit's root first, so one unit is materialised at a time).
    Tensors shared by several modules (tied embeddings) stay shared.
    """

    def __init__(self, model: torch.nn.Module, seed: int, device: torch.device):
        self.seed = seed
        self.device = torch.device(device)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.init_weights = base._init_weights  # the architecture's own init scheme
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
            if real is None:
                real = torch.empty_like(tensor, device=self.device)
                if isinstance(tensor, torch.nn.Parameter):
                    real = torch.nn.Parameter(real, requires_grad=tensor.requires_grad)
                if id(tensor) in self.shared:
                    self.materialised[id(tensor)] = real
            table[name] = real
        return first

    def __call__(self, root: torch.nn.Module) -> None:
        fresh = [(module, meta) for module in root.modules()
                 if (meta := self._materialise(module)) is not None]
        for module, meta in fresh:
            with self._seeded(self.tensor_names[id(meta)]), torch.no_grad():
                self.init_weights(module)
        fresh_modules = {module for module, _ in fresh}
        for module in root.modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or not hasattr(module, "reset_lora_parameters"):
                continue
            for adapter, layer in lora_a.items():
                if layer in fresh_modules:
                    with self._seeded(f"{self.module_names[id(module)]}/lora/{adapter}"), \
                            torch.no_grad():
                        module.reset_lora_parameters(adapter, self.lora_init.get(adapter, True))


def quantized_random_init(model: torch.nn.Module, quantization_config, seed: int,
                          device) -> torch.nn.Module:
    """A random-init model (built on the meta device) with its linear layers in 4-bit, as
    ``from_pretrained(..., quantization_config=...)`` would give for a checkpoint holding the
    same seeded weights: each linear layer is initialised on ``device`` and quantised at once,
    one at a time, so no full-precision copy of the model ever exists."""
    import bitsandbytes as bnb

    if not getattr(quantization_config, "load_in_4bit", False):
        raise ValueError("a random-init model can be quantised to 4-bit only (8-bit needs "
                         "weights on disk)")
    init = SeededInit(model, seed, device)
    skip = set(quantization_config.llm_int8_skip_modules or [])
    quantize = [(name, module) for name, module in model.named_modules()
                if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] not in skip
                and name not in skip]
    for name, linear in quantize:
        init(linear)  # seeded full-precision values, this layer only
        packed = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=quantization_config.bnb_4bit_compute_dtype,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_type=quantization_config.bnb_4bit_quant_type,
            quant_storage=quantization_config.bnb_4bit_quant_storage, device="meta")
        packed.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False,
            quant_type=quantization_config.bnb_4bit_quant_type,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_storage=quantization_config.bnb_4bit_quant_storage, module=packed).to(device)
        if linear.bias is not None:
            packed.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    init(model)  # everything else: embeddings, norms, lm_head, rotary tables
    model.config.quantization_config = quantization_config
    model.is_loaded_in_4bit = True
    return model
