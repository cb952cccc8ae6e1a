"""AMBLE: adaptive mini-batch and local epochs for federated learning, with a serverless parameter server."""

__version__ = "0.1.0"
