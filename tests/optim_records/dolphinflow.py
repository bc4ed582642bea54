import torch
from optim_table import BackendCheck, OptimRecord

from shardflow import DolphinFlow
from shardflow.ops.native import dolphinflow as dolphinflow_native

RECORDS = [
    OptimRecord(
        name="DolphinFlow",
        factory=DolphinFlow,
        configs=[
            {"ortho_mode": "vector", "lr": 1e-2},
            {"ortho_mode": "vector", "vector_mode": "flat", "adaptive_lr": False, "lr": 1e-2},
            {"ortho_mode": "block", "block_size": 4, "lr": 1e-2},
            {"ortho_mode": "matrix", "nesterov": False, "lr": 1e-2, "trust_region": 0.05},
            {"ortho_mode": None, "dynamic_momentum": True, "lr": 1e-2},
            {"ortho_mode": "matrix", "ns_orthograd": "gradient", "lr": 1e-2},
            {
                "ortho_mode": "block",
                "block_size": 4,
                "ns_orthograd": "direction",
                "vector_mode": "flat",
                "ns_coeffs": "polar_express",
                "lr": 1e-2,
            },
        ],
        invalid=[
            ({"lr": -1.0}, r"lr=-1\.0 is invalid"),
            ({"momentum": 1.0}, r"momentum=1\.0 is invalid.*\[0, 1\)"),
            ({"beta2": -0.1}, r"beta2=-0\.1 is invalid"),
            ({"ortho_mode": "spectral"}, r"ortho_mode='spectral' is invalid.*choose one of"),
            ({"block_size": 0}, r"block_size=0 is invalid.*>= 1"),
            (
                {"ns_min_steps": 4, "ns_max_steps": 2},
                r"ns_min_steps=4 is larger than ns_max_steps=2",
            ),
            ({"trust_region": 0.0}, r"trust_region=0\.0 is invalid.*> 0"),
            ({"gradient_clipping": -1.0}, r"gradient_clipping=-1\.0 is invalid"),
            ({"momentum_bounds": (0.9, 0.5)}, r"momentum_bounds=\(0\.9, 0\.5\) is invalid"),
            ({"vector_mode": "cols"}, r"vector_mode='cols' is invalid"),
            ({"ns_coeffs": "jordan"}, r"ns_coeffs='jordan' is invalid.*muon"),
            ({"ns_orthograd": "weights"}, r"ns_orthograd='weights' is invalid.*direction"),
            ({"weight_decay": -0.1}, r"weight_decay=-0\.1 is invalid"),
            ({"foreach": "yes"}, r"foreach='yes' is invalid"),
            ({"compiled": "yes"}, r"compiled='yes' is invalid.*True, False or None"),
        ],
        # every backend runs dolphinflow_rule's operations in its order: fp32 results agree to
        # a few ulps (a changed constant or sign moves weights by O(lr) = 1e-2)
        backends={
            "foreach": BackendCheck(dtypes=(torch.float32, torch.float64)),
            "native": BackendCheck(available=dolphinflow_native.available),
            "compiled": BackendCheck(dtypes=(torch.float32, torch.float64), slow=True),
        },
    )
]
