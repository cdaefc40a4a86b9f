"""Hugging Face transformers' DeepseekV3ForCausalLM on a K2-format checkpoint: the independent peer.

Weights are dequantized by our loader (transformers' own FP8 path mishandles partial blocks) and
handed over in float32; experts are stacked into the fused layout of transformers 5.x
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), the major version
pyproject's test extra asks for. Used by the parity tests and by the side-by-side benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from k2serve.worker.loader import Checkpoint


def hf_config(model_dir: str | Path):
    from transformers import DeepseekV3Config

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "quantization_config", "auto_map", "architectures")}
    config = DeepseekV3Config(**raw)
    config._attn_implementation = "eager"
    return config


def hf_state_dict(model_dir: str | Path, config) -> dict[str, torch.Tensor]:
    """Checkpoint tensors dequantized to float32, renamed/stacked the way transformers expects them."""
    ckpt = Checkpoint(model_dir)
    state = {}
    for name in ckpt.weight_map:
        if name.endswith("_scale_inv") or ".mlp.experts." in name:
            continue
        state[name] = ckpt.read_dense(name)
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(config.n_routed_experts)
        gate_up = [torch.cat([ckpt.read_dense(f"{prefix}.{e}.gate_proj.weight"),
                              ckpt.read_dense(f"{prefix}.{e}.up_proj.weight")]) for e in experts]
        state[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{prefix}.down_proj"] = torch.stack([ckpt.read_dense(f"{prefix}.{e}.down_proj.weight") for e in experts])
    return state


def load_hf_model(model_dir: str | Path):
    """transformers' DeepseekV3ForCausalLM in float32 with our dequantized weights, eval mode."""
    from transformers import DeepseekV3ForCausalLM

    config = hf_config(model_dir)
    model = DeepseekV3ForCausalLM(config).float().eval()
    if f"model.layers.{config.num_hidden_layers - 1}.mlp.experts.gate_up_proj" not in model.state_dict():
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} does not store DeepseekV3 experts fused; "
                           "the reference needs transformers 5.x (pip install 'transformers>=5')")
    missing, unexpected = model.load_state_dict(hf_state_dict(model_dir, config), strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"transformers state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model
