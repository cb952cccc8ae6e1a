"""The device side: local training with a plan."""

from amble.client.trainer import LocalResult, LocalTrainer, batch_indices, derive_seed, evaluate

__all__ = ["LocalResult", "LocalTrainer", "batch_indices", "derive_seed", "evaluate"]
