"""Losses for training with ShardFlow: StableMax cross-entropy (the maths lives in
:mod:`shardflow.ops.stablemax`).

``stablemax_cross_entropy(logits, target)`` is a drop-in for ``F.cross_entropy`` that cannot
collapse to a zero loss and zero gradient when the logits grow large (Prieto et al., arXiv
2501.04697); pair it with DolphinFlow's ⊥Grad (``ortho_mode="vector"``), as the README shows.
"""

from shardflow.ops.stablemax import (
    log_stablemax,
    log_stablemax_scores,
    stablemax,
    stablemax_cross_entropy,
)

__all__ = ["log_stablemax", "log_stablemax_scores", "stablemax", "stablemax_cross_entropy"]
