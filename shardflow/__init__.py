"""ShardFlow: sharded, orthogonalizing, memory-frugal optimizers and the runtime that carries them."""

__version__ = "0.1.0"
