"""The cluster: the one config file, Ray placement, worker groups and their rank actors, the controller
and its discovery endpoint, the router process's wiring, the `k2serve` CLI, the tiny checkpoint, and the
capacity planner and load generator.

It owns how the parts are composed and started. It sits on top: it may import the router, the worker
and the kernels, which must not import it.
"""
