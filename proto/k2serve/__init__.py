"""k2serve: a serving cluster for Kimi K2 Instruct (DeepSeek-V3 architecture).

The distribution's one import name. pyproject.toml maps the repository's folders onto it:
`k2serve.router` (router/: HTTP APIs, text, worker pool), `k2serve.worker` (worker/: engine and model),
`k2serve.cluster` (cluster/: config, Ray groups, controller, CLI), `k2serve.kernels` (kernels/: FP8
kernels and their torch references) and `k2serve.v1` (proto/k2serve/v1/: the gRPC wire contract and
its generated stubs). This file lives beside the protos because the stubs' package path starts here.
It holds no code of its own: modules must not import names from it, only from its subpackages.
"""
