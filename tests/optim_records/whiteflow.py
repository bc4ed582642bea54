from optim_table import BackendCheck, OptimRecord

from shardflow.ops.native import whiteflow as whiteflow_native
from shardflow.optim.whiteflow import WhiteFlow

RECORDS = [
    OptimRecord(
        name="WhiteFlow",
        factory=WhiteFlow,
        configs=[
            {"lr": 1e-2},
            {"lr": 1e-2, "rank": 4, "proj_update_freq": 2, "norm_growth_limit": 1.01},
            {"lr": 1e-2, "second_moment": "dense", "shape_lr_scaling": True},
            {"lr": 1e-2, "stochastic_rounding": False, "projection_device": "cpu"},
            {"lr": 1e-2, "ortho_mode": None},
        ],
        invalid=[
            ({"lr": -1.0}, r"lr=-1\.0 is invalid"),
            ({"rank": 0}, r"rank=0 is invalid: pass an integer >= 1"),
            ({"proj_update_freq": 0}, r"proj_update_freq=0 is invalid: pass a positive integer"),
            ({"proj_update_freq": -5}, r"proj_update_freq=-5 is invalid"),
            (
                {"projection_device": "gpu"},
                r"projection_device='gpu' is invalid: choose one of \['param', 'cpu'\]",
            ),
            ({"second_moment": "full"}, r"second_moment='full' is invalid.*choose one of"),
            ({"betas": (0.9, 1.0)}, r"betas\[1\]=1\.0 is invalid.*\[0, 1\)"),
            ({"norm_growth_limit": 0.5}, r"norm_growth_limit=0\.5 is invalid: pass a number > 1"),
            ({"ortho_mode": "matrix"}, r"ortho_mode='matrix' is invalid"),
            ({"weight_decay": -0.1}, r"weight_decay=-0\.1 is invalid"),
            ({"seed": 1.5}, r"seed=1\.5 is invalid: pass an integer"),
            ({"foreach": "yes"}, r"foreach='yes' is invalid"),
            ({"compiled": "yes"}, r"compiled='yes' is invalid.*True, False or None"),
        ],
        # the native kernels run the eager passes' operations in their order and draw the same
        # rounding bits; fp32 sums in another order (tests/test_whiteflow_native.py). Compiled
        # (compiled=True) is checked by test_whiteflow.py's test_compiled_equals_eager
        # (SHARDFLOW_TEST_COMPILE=1: its first compile takes 35-130 s on a 2-core CPU).
        backends={"native": BackendCheck(available=whiteflow_native.available)},
    )
]
