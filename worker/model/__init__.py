"""The DeepSeek-V3 / Kimi K2 model: its config, the decoder and its layers, and the attention metadata a
forward pass reads; layers own their sharding and their collectives.

It owns the model's math (docs/k2-format.md). It may import k2serve.worker.parallel and k2serve.kernels;
it must not import the serving side of the worker (engine, scheduler, KV cache manager, runner, server),
the router or the cluster.
"""
