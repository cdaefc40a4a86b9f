"""The worker groups behind one router: discovery, health probes, balancing with circuit breakers,
admission control, retries, and the gRPC client and session to each group.

It owns the `Worker` (one group) and `WorkerPool` (all of them) protocols that the request path uses,
and the plain data crossing the router/worker boundary (worker.py). It must not import api/,
generation/, text/, context.py or app.py: the request path depends on the pool, not the reverse.
Protobuf objects stay in worker_client.py and worker_session.py.
"""
