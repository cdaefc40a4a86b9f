"""A K2-format checkpoint rewritten as a plain DeepseekV3 checkpoint, the form vLLM (and any peer) loads.

What changes: every block-FP8 matrix is dequantized by our own loader (`Checkpoint.read_dense`, the
weights k2serve computes with) and stored dense in float32, its `_scale_inv` dropped; config.json says
`model_type: deepseek_v3` and has no `quantization_config`. Names stay as K2 stores them (per-expert
`mlp.experts.E.{gate,up,down}_proj`, the names vLLM's DeepseekV3 loader expects). Float32 keeps the
weights exact: a peer casts them to the dtype it runs in (vLLM's CPU MoE wants bf16 or fp16).
The tokenizer files are copied so that our engine can load the result as well.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2serve.worker.loader import SCALE_SUFFIX, Checkpoint

DROPPED_CONFIG_KEYS = ("quantization_config", "auto_map")
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
WEIGHTS_FILE = "model.safetensors"


def plain_config(k2_config: dict) -> dict:
    """The checkpoint's config.json as a plain DeepseekV3 one (no quantization, dense float32 weights)."""
    config = {k: v for k, v in k2_config.items() if k not in DROPPED_CONFIG_KEYS}
    config.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], torch_dtype="float32")
    return config


def plain_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor except the FP8 scales, dense: FP8 matrices dequantized to float32, the rest as stored
    (bf16 embeddings, norms and router, the float32 routing bias)."""
    ckpt = Checkpoint(model_dir)
    tensors = {}
    for name in ckpt.weight_map:
        if name.endswith(SCALE_SUFFIX):
            continue
        tensors[name] = ckpt.read_dense(name) if ckpt.is_fp8(name) else ckpt.read(name)
    return tensors


def write_plain_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `model_dir` (K2 format) to `out_dir` as a plain DeepseekV3 checkpoint; returns `out_dir`."""
    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k2_config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(plain_config(k2_config), indent=2) + "\n")
    tensors = {name: t.contiguous() for name, t in plain_tensors(src).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out
