"""DolphinFlow8bit in the optimizer table.

The contract model's weights have fewer than 4096 elements, so the configs lower
``min_8bit_size`` to quantize them (one config keeps the default: everything fp32). The class is
imported when a test builds it, so collecting the table never needs bitsandbytes.
"""

from optim_table import BackendCheck, OptimRecord


def _quant8_native_available() -> bool:
    from shardflow.ops.native import quant8 as quant8_native  # noqa: PLC0415

    return quant8_native.available()


def dolphinflow8bit(params, **config):
    from shardflow.optim.dolphinflow8bit import DolphinFlow8bit  # noqa: PLC0415

    return DolphinFlow8bit(params, **config)


RECORDS = [
    OptimRecord(
        name="DolphinFlow8bit",
        factory=dolphinflow8bit,
        needs=("bitsandbytes",),
        configs=[
            {"ortho_mode": "vector", "lr": 1e-2, "min_8bit_size": 0},
            {
                "ortho_mode": "vector",
                "vector_mode": "flat",
                "adaptive_lr": False,
                "lr": 1e-2,
                "min_8bit_size": 0,
            },
            {
                "ortho_mode": "block",
                "block_size": 4,
                "lr": 1e-2,
                "min_8bit_size": 0,
                "chunk_elements": 200,
            },
            {
                "ortho_mode": "matrix",
                "nesterov": False,
                "lr": 1e-2,
                "trust_region": 0.05,
                "min_8bit_size": 0,
            },
            {"ortho_mode": None, "dynamic_momentum": True, "lr": 1e-2, "min_8bit_size": 0},
            {"ortho_mode": "vector", "lr": 1e-2},
        ],
        invalid=[
            ({"min_8bit_size": -1}, r"min_8bit_size=-1 is invalid.*>= 0"),
            ({"min_8bit_size": 1.5}, r"min_8bit_size=1\.5 is invalid"),
            ({"chunk_elements": 0}, r"chunk_elements=0 is invalid.*>= 1"),
            ({"lr": -1.0}, r"lr=-1\.0 is invalid"),
            ({"momentum": 1.0}, r"momentum=1\.0 is invalid.*\[0, 1\)"),
            ({"ortho_mode": "spectral"}, r"ortho_mode='spectral' is invalid.*choose one of"),
            ({"foreach": "yes"}, r"foreach='yes' is invalid"),
        ],
        # the reference: dequantize, DolphinFlow's rule called eagerly, requantize (slab by
        # slab); native: the same three steps in one pass of csrc/quant8.c, whose rule is
        # csrc/dolphinflow_rule.h; a moment may requantize one code apart where the two
        # roundings straddle a code midpoint
        backends={
            "foreach": BackendCheck(),
            "native": BackendCheck(
                available=_quant8_native_available, code_steps=1, code_fraction=1e-3
            ),
        },
    )
]
