"""Writing reference fixtures.

A fixture is one safetensors file holding, in float64:
  input.<name>       inputs (floating inputs get gradients),
  param.<name>       every parameter of the module under its Rust name,
  output             the forward output,
  loss_weight        R in the scalar loss L = sum(output * R),
  grad.input.<name>  dL/d input, grad.param.<name> dL/d param,
  f32.output, f32.grad.input.<name>, f32.grad.param.<name>
                     the same computation done by PyTorch in float32 (stored as float32): how far
                     PyTorch's own float32 result is from the float64 truth calibrates the bound
                     for the Rust float32 run,
and metadata key "fixture": a JSON object with layer, case, config (the Rust config) and any extra
string fields.

Inputs and parameters are rounded to float32 first, so the Rust float32 run sees exactly the values
the float64 reference used; the reference computation itself runs in float64.
"""

import copy
import json
import os

import torch
from safetensors.torch import save_file


def round_to_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(torch.float64) if t.is_floating_point() else t


def randn(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return round_to_f32(torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)


def init_params(module: torch.nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    """Gives every parameter f32-representable random values: N(0, (scale / sqrt(fan_in))^2) for
    matrices, N(0, 0.1^2) for vectors (biases and norm parameters get non-trivial values too, so their
    gradients are tested, not just their defaults)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(randn(gen, *p.shape, scale=scale / p.shape[-1] ** 0.5))
            elif name.endswith("norm.weight") or ".norms." in name and name.endswith("weight"):
                p.copy_(1.0 + randn(gen, *p.shape, scale=0.1))
            else:
                p.copy_(randn(gen, *p.shape, scale=0.1))


def write_fixture(out_dir, group, case, *, layer, config, module, inputs, forward, seed, extra_meta=None,
                  extra_tensors=None):
    """Runs `forward(module, inputs)` in float64, backpropagates L = sum(output * R) and saves it all.

    `extra_tensors` (optional) are saved under their own names, as is (floating ones in float64): e.g.
    buffer values from before the forward pass, or data a layer is fitted on."""
    module = module.double()
    module32 = copy.deepcopy(module).float()
    inputs = {k: round_to_f32(v).clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = forward(module, inputs)
    gen = torch.Generator().manual_seed(seed + 7919)
    loss_weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * loss_weight).sum().backward()

    inputs32 = {k: (v.detach().float().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    out32 = forward(module32, inputs32)
    (out32 * loss_weight.float()).sum().backward()

    tensors = {}
    for k, v in inputs.items():
        tensors[f"input.{k}"] = v.detach().contiguous()
        if v.is_floating_point():
            g = v.grad if v.grad is not None else torch.zeros_like(v)
            tensors[f"grad.input.{k}"] = g.contiguous()
    for name, p in module.named_parameters():
        tensors[f"param.{name}"] = p.detach().contiguous()
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        tensors[f"grad.param.{name}"] = g.contiguous()
    for name, b in module.named_buffers():
        tensors[f"buffer.{name}"] = b.detach().contiguous()
    for k, v in inputs32.items():
        if v.is_floating_point():
            tensors[f"f32.grad.input.{k}"] = (v.grad if v.grad is not None else torch.zeros_like(v)).contiguous()
    for name, p in module32.named_parameters():
        tensors[f"f32.grad.param.{name}"] = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
    tensors["f32.output"] = out32.detach().contiguous()
    for name, t in (extra_tensors or {}).items():
        t = t.detach()
        tensors[name] = (t.to(torch.float64) if t.is_floating_point() else t).contiguous()
    tensors["output"] = out.detach().contiguous()
    tensors["loss_weight"] = loss_weight.contiguous()

    # One metadata key holding sorted JSON: safetensors writes its metadata map in arbitrary order,
    # and a single key keeps the file bytes (and so the manifest hashes) reproducible.
    fields = {"layer": layer, "case": case, "config": config}
    fields.update({k: str(v) for k, v in (extra_meta or {}).items()})
    meta = {"fixture": json.dumps(fields, sort_keys=True)}
    path = os.path.join(out_dir, group)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, f"{case}.safetensors"), metadata=meta)


def emit_case(out_dir, group, case, seed, *, layer, config, module, make_inputs, forward, weight_scale=1.0,
              extra_meta=None):
    """The common case recipe: seed a generator, give `module` random parameters, draw the inputs with
    `make_inputs(gen)` and write the fixture."""
    gen = torch.Generator().manual_seed(seed)
    init_params(module, gen, scale=weight_scale)
    write_fixture(out_dir, group, case, layer=layer, config=config, module=module, inputs=make_inputs(gen),
                  forward=forward, seed=seed, extra_meta=extra_meta)
