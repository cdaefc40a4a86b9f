"""One worker group: the engine (scheduler, paged latent KV cache, sampler, guided decoding), the model
and its loader, the plumbing of a group's ranks (process groups, plan broadcast) and the gRPC server.

It owns everything below the k2serve.v1 wire contract. It must not import k2serve.router or
k2serve.cluster (routers speak gRPC to it; cluster/ starts its ranks); scheduler.py and kv_cache.py
must not import torch, and model/ knows nothing of serving.
"""
