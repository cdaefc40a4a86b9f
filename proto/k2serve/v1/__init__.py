"""The gRPC wire contract between routers and worker groups: worker.proto and its generated stubs.

It owns the messages and the Worker service (`python proto/generate.py` regenerates the stubs). It must not
import any other part of k2serve; only the gRPC edge modules of the router and the worker import it.
"""
