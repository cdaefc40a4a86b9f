"""One choice of a request: a worker's token stream becomes text, tool-call and done events; n choices
are merged as they stream or collected whole.

It owns the events the HTTP APIs render (events.py). It builds on text/ and on pool/worker.py's plain
data, errors and metrics; it must not import api/, context.py or app.py, nor anything HTTP (FastAPI,
Starlette), and it never picks a worker: it is handed the stream.
"""
