"""The model's layers: parallel linears, MLA attention, MoE routing, experts and dispatchers, rotary
embedding, norms and embeddings, one concept per file.

They own their weights' sharding and the collective each needs. They must not import the decoder
(deepseek_v3.py) or anything outside k2serve.worker.model, k2serve.worker.parallel and k2serve.kernels.
"""
