"""Floor 1 of ShardFlow: the maths every optimizer shares, importing only torch.

- :mod:`.orthogonalize` — Newton-Schulz (whole matrix and block, batched), ⊥Grad, the
  ``(out, rest)`` matrix view;
- :mod:`.precision` — stochastic rounding to bf16 with shard-invariant random bits, and the
  low-precision weight store (Kahan compensation, stochastic rounding, round-to-nearest);
- :mod:`.quant8` — bitsandbytes' block-wise 8-bit state codes;
- :mod:`.projection` — seeded low-rank random projections;
- :mod:`.stablemax` — StableMax and its cross-entropy (re-exported as :mod:`shardflow.losses`);
- :mod:`.listops` — list arithmetic (foreach kernels or a plain loop);
- :mod:`.compiling` — how an element-wise pass runs through ``torch.compile``;
- :mod:`.native` — hand-written C kernels (sources in ``native/csrc``) and their one builder.

Nothing here knows about optimizers, placements, checkpoints or the runtime: ``distributed``,
``optim`` and everything above import this floor, never the other way round.
"""
