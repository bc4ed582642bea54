from optim_table import BackendCheck, OptimRecord

from shardflow.ops.native import factored as factored_native
from shardflow.optim.factored import FactoredAdam, FactoredAdopt, FactoredProdigy

_COMMON_INVALID = [
    ({"lr": -1.0}, r"lr=-1\.0 is invalid: pass a learning rate >= 0"),
    ({"betas": (0.9, 1.0)}, r"betas=\(0\.9, 1\.0\) is invalid: pass \(beta1, beta2\)"),
    ({"betas": (0.9,)}, r"betas=\(0\.9,\) is invalid"),
    ({"eps": -1e-8}, r"eps=-1e-08 is invalid: pass a finite number >= 0"),
    ({"weight_decay": -0.1}, r"weight_decay=-0\.1 is invalid"),
    ({"factored": "yes"}, r"factored='yes' is invalid: pass True or False"),
    ({"ademamix_beta3": 1.0}, r"ademamix_beta3=1\.0 is invalid.*\[0, 1\)"),
    ({"ademamix_alpha": -5.0}, r"ademamix_alpha=-5\.0 is invalid"),
    ({"ademamix_warmup": 0}, r"ademamix_warmup=0 is invalid: pass an integer >= 1"),
    (
        {"ademamix_warmup": 10, "betas": (0.0, 0.999)},
        r"ademamix_warmup=10 is invalid.*betas\[0\] > 0",
    ),
    ({"atan2": 1}, r"atan2=1 is invalid: pass True or False"),
    ({"gradient_clipping": 0.0}, r"gradient_clipping=0\.0 is invalid"),
]

RECORDS = [
    OptimRecord(
        name="FactoredAdam",
        factory=FactoredAdam,
        foreach=False,
        configs=[
            {"lr": 1e-2},
            {"lr": 1e-2, "factored": False},
            {"lr": 1e-2, "ademamix": True, "ademamix_warmup": 4, "atan2": True},
            {"lr": 1e-2, "orthograd": True, "grams": True, "gradient_clipping": 1.0},
        ],
        invalid=_COMMON_INVALID,
        # the native kernel takes FactoredAdam's plain rule on factored fp32 matrices (the first
        # config; the others run the torch path under both backends): the same operations in
        # C, fp32 sums in another order (tests/test_factored_native.py)
        backends={"native": BackendCheck(available=factored_native.available)},
    ),
    OptimRecord(
        name="FactoredAdopt",
        factory=FactoredAdopt,
        foreach=False,
        configs=[
            {"lr": 1e-2},
            {"lr": 1e-2, "factored": False, "ademamix": True, "ademamix_warmup": 4},
            {"lr": 1e-2, "atan2": True, "grams": True, "weight_decay": 0.1},
        ],
        invalid=[*_COMMON_INVALID, ({"clip": None}, r"clip=None is invalid: pass True or False")],
    ),
    OptimRecord(
        name="FactoredProdigy",
        factory=FactoredProdigy,
        foreach=False,
        configs=[
            {"d0": 1e-3},
            {"d0": 1e-3, "factored": False, "slice_p": 1, "orthograd": True},
            {"d0": 1e-3, "ademamix": True, "atan2": True, "slice_p": 3, "weight_decay": 0.1},
        ],
        invalid=[
            *_COMMON_INVALID,
            ({"d0": 0.0}, r"d0=0\.0 is invalid: pass a number > 0"),
            ({"d_coef": -1.0}, r"d_coef=-1\.0 is invalid"),
            (
                {"growth_rate": 0.5},
                r"growth_rate=0\.5 is invalid: pass a number >= 1, or math\.inf",
            ),
            ({"beta3": 1.5}, r"beta3=1\.5 is invalid"),
            ({"slice_p": 0}, r"slice_p=0 is invalid: pass an integer >= 1"),
        ],
    ),
]
