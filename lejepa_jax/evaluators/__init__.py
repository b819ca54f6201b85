"""Frozen evaluation on sharded features: `features.extract`, linear probe, k-NN.

Features stay sharded global arrays over the mesh's batch axes (see
`features.Features`); the evaluators run sharded on them, and each exposes
`programs(...)` for ahead-of-time compilation from abstract shapes.
"""
