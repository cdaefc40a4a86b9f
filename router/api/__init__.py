"""The router's HTTP side: the OpenAI and Anthropic handlers, their request models, error responses,
SSE framing, the request metrics and auth middleware, and the probes.

It owns what clients see on the wire. It builds on context.py, generation/, text/ and the plain data of
pool/worker.py; it must not import app.py (which imports it) or the gRPC modules (pool/worker_client.py,
pool/worker_session.py), and nothing below it may import it.
"""
