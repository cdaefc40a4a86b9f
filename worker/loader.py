"""Load a K2-format checkpoint (safetensors shards + index, block-FP8 matrices) into the model.

Each parameter names its checkpoint tensor through NAME_TABLE (identity for K2: the model keeps
the checkpoint's names) and declares its shard (worker/model/layers/linear.py ShardSpec); the loader
reads only that slice from disk, so a rank never reads another rank's experts or heads. FP8
matrices are dequantized on CPU with their `weight_scale_inv`; `read_fp8` keeps the raw data and
scales for GPU kernels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from k2serve.kernels.block_fp8 import DEFAULT_BLOCK, FP8_DTYPE, expand_block_scales, quantize_block_fp8
from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.deepseek_v3 import DeepseekV3ForCausalLM
from k2serve.worker.model.layers.linear import Fp8Weights
from k2serve.worker.parallel import ParallelInfo

log = logging.getLogger(__name__)

# Model parameter name -> checkpoint tensor name, where they differ. K2's names are kept as they are.
NAME_TABLE: dict[str, str] = {}
# Checkpoint entries that are never loaded.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
SCALE_SUFFIX = "_scale_inv"


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model: names the tensor and what was wrong."""


class Checkpoint:
    """The tensors of a checkpoint directory, opened lazily shard by shard."""

    def __init__(self, model_dir: str | Path, block: tuple[int, int] = DEFAULT_BLOCK):
        self.dir, self.block = Path(model_dir), block
        self.weight_map = read_weight_map(self.dir)
        self._files: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        shard = self.weight_map[name]
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._files[shard].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The stored tensor (or a slice of it), in its stored dtype."""
        sl = self._slice(name)
        return sl[index] if index else sl[:]

    def is_fp8(self, name: str) -> bool:
        return name + SCALE_SUFFIX in self.weight_map

    def read_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw e4m3 data and float32 scale_inv, for kernels that consume FP8 directly."""
        return self.read(name), self.read(name + SCALE_SUFFIX).float()

    def read_dense(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """The tensor (rows/cols slice of a matrix) in float32, block-FP8 dequantized."""
        if not self.is_fp8(name):
            index = (rows, cols)[: len(self.shape(name))]
            return self.read(name, index).float()
        return self.dequantize_slice(name, rows, cols)

    def read_fp8_slice(self, name: str, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """A slice as block-FP8 whose blocks start at the slice: the stored bytes and scales when it starts
        on block boundaries (K2's TP shards do), else dequantized and quantized again (one more rounding)."""
        if not self.is_fp8(name):
            raise CheckpointError(f"tensor {name!r} is not block-FP8 in the checkpoint, but the model holds it as FP8")
        n_rows, n_cols = self.shape(name)
        r0, r1, _ = rows.indices(n_rows)
        c0, c1, _ = cols.indices(n_cols)
        bn, bk = self.block
        if r0 % bn or c0 % bk:
            return quantize_block_fp8(self.dequantize_slice(name, rows, cols), self.block)
        scale = self.read(name + SCALE_SUFFIX).float()[r0 // bn : -(-r1 // bn), c0 // bk : -(-c1 // bk)]
        return self.read(name, (slice(r0, r1), slice(c0, c1))), scale.contiguous()

    def dequantize_slice(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        n_rows, n_cols = self.shape(name)
        r0, r1, _ = rows.indices(n_rows)
        c0, c1, _ = cols.indices(n_cols)
        bn, bk = self.block
        data = self.read(name, (slice(r0, r1), slice(c0, c1)))
        if data.dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor {name!r} has a scale_inv but dtype {data.dtype}, expected {FP8_DTYPE}")
        scale = self.read(name + SCALE_SUFFIX).float()
        expected = (-(-n_rows // bn), -(-n_cols // bk))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{name + SCALE_SUFFIX!r} has shape {tuple(scale.shape)}, expected {expected}")
        scale = scale[r0 // bn : -(-r1 // bn), c0 // bk : -(-c1 // bk)]
        full = expand_block_scales(scale, (scale.shape[0] * bn, scale.shape[1] * bk), self.block)
        full = full[r0 % bn : r0 % bn + (r1 - r0), c0 % bk : c0 % bk + (c1 - c0)]
        return data.float() * full


def read_weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").exists():
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise CheckpointError(f"no model.safetensors.index.json or model.safetensors in {model_dir}")
    return {k: v for k, v in weight_map.items() if not k.endswith(SKIPPED_SUFFIXES)}


def shard_slices(param: torch.Tensor, full_shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Row and column slices of the checkpoint tensor that this parameter holds."""
    index = [slice(None), slice(None)]
    spec = getattr(param, "shard", None)
    if spec is not None:
        n = param.shape[spec.dim]
        index[spec.dim] = slice(spec.rank * n, (spec.rank + 1) * n)
    return index[0], index[1]


def check_shape(ckpt_name: str, full_shape, got: torch.Tensor, want: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(want.shape):
        raise CheckpointError(
            f"tensor {ckpt_name!r}: checkpoint shape {full_shape} gives {tuple(got.shape)} for this rank, "
            f"the model expects {tuple(want.shape)}"
        )


def load_parameter(ckpt: Checkpoint, name: str, param: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Copy this rank's slice of the checkpoint tensor into `param` (and its scale_inv for FP8 params)."""
    ckpt_name = NAME_TABLE.get(name, name)
    full_shape = ckpt.shape(ckpt_name)
    rows, cols = shard_slices(param, full_shape)
    if param.dtype == FP8_DTYPE:
        data, scale_inv = ckpt.read_fp8_slice(ckpt_name, rows, cols)
        check_shape(ckpt_name, full_shape, data, param)
        check_shape(ckpt_name + SCALE_SUFFIX, "(block scales)", scale_inv, scale)
        with torch.no_grad():
            param.copy_(data)
            scale.copy_(scale_inv)
        return
    tensor = ckpt.read_dense(ckpt_name, rows, cols)
    check_shape(ckpt_name, full_shape, tensor, param)
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


def load_weights(model: torch.nn.Module, model_dir: str | Path, block=DEFAULT_BLOCK, progress: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint, reading only this rank's slices, then let
    modules prepare their weights for compute (`process_weights_after_loading`)."""
    ckpt = Checkpoint(model_dir, block)
    params = dict(model.named_parameters())
    names = [n for n in params if not n.endswith(SCALE_SUFFIX)]  # scales load with their weights
    for name in tqdm(names, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        load_parameter(ckpt, name, params[name], params.get(name + SCALE_SUFFIX))
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    log.info("loaded %d tensors from %s", len(names), model_dir)


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, info: ParallelInfo = ParallelInfo(),
    dispatcher: str = "all_to_all", progress: bool = True, fp8_backend: str | None = None,
    device: str = "cpu",
) -> DeepseekV3ForCausalLM:
    """Build the model for this rank from config.json and load its weights (eval mode, no grad).

    `fp8_backend`: None holds every matrix dense in `dtype`; "auto" keeps block-FP8 matrices and picks
    the kernel backend for `device` (Triton on CUDA); "torch" or "triton" force one.
    """
    config = ModelConfig.from_dir(model_dir)
    block = config.weight_block_size or DEFAULT_BLOCK
    fp8 = None
    if fp8_backend is not None:
        from k2serve.kernels.backend import select_backend

        force = None if fp8_backend == "auto" else fp8_backend
        fp8 = Fp8Weights(select_backend(torch.device(device), force), block)
    with torch.device(device):  # parameters are created where they live: no host copy of the weights
        model = DeepseekV3ForCausalLM(config, info, dtype, dispatcher, fp8)
    load_weights(model, model_dir, block, progress)
    return model.eval().requires_grad_(False)
