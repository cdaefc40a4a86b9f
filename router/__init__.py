"""The HTTP router: OpenAI- and Anthropic-compatible APIs in front of the worker groups.

It owns everything between a client's HTTP request and the token ids a worker group streams back:
app.py (create_app: the middleware and the route table every request follows), context.py (what each
handler works with), api/ (handlers and wire formats), generation/ (a choice's events), text/ (tokenizer,
chat template, detokenizer, tool calls, stop strings) and pool/ (the worker groups: discovery, balancing,
admission, the gRPC client). It knows the workers only through the k2serve.v1 wire contract: it must not
import k2serve.worker, k2serve.cluster or k2serve.kernels (cluster/ composes the router from the config).
"""
