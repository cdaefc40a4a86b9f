"""`k2serve plan` against published serving numbers: the table in README's "Capacity planning" section.

Nothing here runs a model: each row is a published measurement (with its source), the planner's
figure for the same setup, and their ratio. Rows where the plan and the measurement differ by more
than 2x carry the reason. tests/test_plan.py checks the other rows stay within 2x.

    python benchmarks/plan_vs_published.py [--ideal]     # --ideal: no efficiency derating
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from k2serve.cluster.efficiency import Efficiency
from k2serve.cluster.gpus import gpu_spec
from k2serve.cluster.plan import Plan, PlanConfig, build_plan, mixed_output_rate
from k2serve.worker.model.config import ModelConfig

# DeepSeek-V3 / R1 config.json (the numbers the planner needs)
DEEPSEEK_V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}
MODELS = {"Kimi K2": ModelConfig(), "DeepSeek-V3/R1": ModelConfig.from_dict(DEEPSEEK_V3)}

TRTLLM_R1 = ("TensorRT-LLM, \"How to get best performance on DeepSeek-R1 in TensorRT-LLM\" "
             "(github.com/NVIDIA/TensorRT-LLM docs/source/blogs/Best_perf_practice_on_DeepSeek-R1_in_TensorRT-LLM.md)")
SGLANG_96_H100 = ("LMSYS, \"Deploying DeepSeek with PD Disaggregation and Large-scale Expert Parallelism on 96 H100 "
                  "GPUs\" (lmsys.org/blog/2025-05-05-large-scale-ep)")
SGLANG_K2_128_H200 = ("LMSYS, \"Deploying Kimi K2 with PD Disaggregation and Large-Scale Expert Parallelism on 128 "
                      "H200 GPUs\" (lmsys.org/blog/2025-07-17-k2-large-scale-ep)")
NODE_DEDUP = ("plan is RDMA-bound: it sends every remote copy over RDMA, as the planned dispatcher will; DeepEP's "
              "prefill kernels send a token once per destination node and fan out over NVLink")
THIRD_PARTY_K2_B200 = "third-party SGLang run (published figures only: no configuration or concurrency)"


@dataclass(frozen=True)
class Published:
    """One published measurement and the plan of the same setup."""

    setup: str
    model: str  # a key of MODELS
    figure: float
    metric: str  # "user": tok/s per user; "decode", "prefill", "mixed": tok/s per GPU
    source: str
    config: PlanConfig
    isl: int = 0  # "mixed" only: prompt and output tokens per request
    osl: int = 0
    explained: str = ""  # why the plan may differ from the figure by more than 2x (the 2x check skips the row)
    note: str = ""  # what else differs between the published setup and the plan


PUBLISHED = (
    Published("Kimi K2, 8xB200, one user, TP8 attention, 2K context", "Kimi K2", 128, "user", THIRD_PARTY_K2_B200,
              PlanConfig(gpu="B200", batch=1, kv_len=2048)),
    Published("Kimi K2, 8xB200, peak per GPU, TP8 attention, 2K context, largest batch the KV holds (393)",
              "Kimi K2", 271, "decode", THIRD_PARTY_K2_B200, PlanConfig(gpu="B200", batch=393, kv_len=2048),
              explained="the run's concurrency is not published: the plan gives 271 tok/s/GPU at about 60 "
                        "sequences; at the 393 sequences the KV cache holds it predicts 4-5x more"),
    Published("DeepSeek-R1 FP8, 8xH200, one user (TP8, EP4, 3-layer MTP), 1K in / 2K out", "DeepSeek-V3/R1", 158,
              "user", TRTLLM_R1, PlanConfig(gpu="H200", batch=1, kv_len=2048),
              note="the plan decodes one token per step and uses EP8; multi-token prediction accepts about two"),
    Published("DeepSeek-R1 FP8, 8xH200, max throughput (attention DP, EP8), 1,024 requests of 1K in / 2K out",
              "DeepSeek-V3/R1", 1436, "mixed", TRTLLM_R1,
              PlanConfig(gpu="H200", tp_size=1, batch=1024, kv_len=2048, prefill_tokens=1151, prompt_len=1024),
              isl=1024, osl=2048),
    Published("DeepSeek-V3, decode, 9x8 H100 (EP72, DP attention, TBO), 256 sequences per GPU, 2K context; "
              "planned on 64 GPUs (256 experts must divide the group)", "DeepSeek-V3/R1", 22282 / 8, "decode",
              SGLANG_96_H100, PlanConfig(gpu="H100", num_gpus=64, tp_size=1, batch=256 * 64, kv_len=2000,
                                         overlap=True)),
    Published("DeepSeek-V3, prefill, 4x8 H100 (EP32, DP attention, TBO), 16,384 tokens per GPU of 2K prompts",
              "DeepSeek-V3/R1", 54543 / 8, "prefill", SGLANG_96_H100,
              PlanConfig(gpu="H100", num_gpus=32, tp_size=1, prefill_tokens=16384, prompt_len=2048, overlap=True),
              note=NODE_DEDUP),
    Published("Kimi K2, decode, 12x8 H200 (EP96, DP attention), 480 sequences per GPU, 2K in / 100 out",
              "Kimi K2", 24000 / 8, "decode", SGLANG_K2_128_H200,
              PlanConfig(gpu="H200", num_gpus=96, tp_size=1, batch=480 * 96, kv_len=2050, overlap=True)),
    Published("Kimi K2, prefill, 4x8 H200 (EP32, DP attention), 2K prompts, 16,384 tokens per GPU assumed",
              "Kimi K2", 56000 / 8, "prefill", SGLANG_K2_128_H200,
              PlanConfig(gpu="H200", num_gpus=32, tp_size=1, prefill_tokens=16384, prompt_len=2000, overlap=True),
              note=NODE_DEDUP),
)


def plan_for(row: Published, efficiency: Efficiency) -> Plan:
    cfg = replace(row.config, efficiency=efficiency)
    return build_plan(MODELS[row.model], cfg, gpu_spec(cfg.gpu))


def planned(row: Published, efficiency: Efficiency = Efficiency()) -> float:
    """The planner's figure for the row's setup, in the row's unit."""
    plan = plan_for(row, efficiency)
    if row.metric == "user":
        return 1.0 / plan.decode.step_s
    if row.metric == "decode":
        return plan.decode_tokens_per_s_per_gpu
    if row.metric == "prefill":
        return plan.prefill_tokens_per_s_per_gpu
    return mixed_output_rate(plan.decode, plan.prefill, row.config.batch, row.isl, row.osl, row.config.num_gpus)


UNITS = {"user": "tok/s/user", "decode": "tok/s/GPU", "prefill": "prefill tok/s/GPU", "mixed": "out tok/s/GPU"}


def table(efficiency: Efficiency) -> str:
    """Markdown rows: setup, published, plan, plan / published, note."""
    lines = ["| Setup | Published | Plan | Plan / published | Note |", "|---|---|---|---|---|"]
    for row in PUBLISHED:
        plan = planned(row, efficiency)
        unit = UNITS[row.metric]
        lines.append(f"| {row.setup} | {row.figure:,.0f} {unit} | {plan:,.0f} {unit} | {plan / row.figure:.2f} "
                     f"| {row.explained or row.note or 'within 2x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ideal", action="store_true", help="no efficiency derating (the pure roofline)")
    args = p.parse_args(argv)
    print(table(Efficiency.ideal() if args.ideal else Efficiency()))
    print("\nSources:")
    for source in dict.fromkeys(row.source for row in PUBLISHED):
        print(f"- {source}")


if __name__ == "__main__":
    main()
