"""Which parameters are orthogonalized and which are updated element-wise.

Orthogonalization is for hidden weight matrices. Embeddings, the output head (tied or not) and
1-D parameters (biases, norm gains) are updated element-wise: their rows are tokens or classes,
not a linear map whose singular directions matter.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

ELEMENTWISE_NAMES = re.compile(
    r"(?:^|\.)(?:embed\w*|wte|wpe|tok_embeddings|lm_head|output|head|classifier|score)(?:\.|$)"
)
"""Parameter names routed element-wise when an optimizer is given named parameters."""


def is_hidden_matrix(param: Tensor, name: str | None = None) -> bool:
    """True for a parameter of 2 or more dims, with elements, whose name (if known) is not an
    embedding/head (an empty matrix, e.g. ``(5, 0)``, has no directions to orthogonalize)."""
    return (
        param.ndim >= 2
        and param.numel() > 0
        and not (name is not None and ELEMENTWISE_NAMES.search(name))
    )


def param_groups(model: nn.Module, **elementwise_overrides: Any) -> list[dict[str, Any]]:
    """Two param groups for ``model``: hidden matrices, and the rest with ``ortho_mode=None``.

    Embedding weights (and any parameter tied to one, such as a tied LM head) and parameters
    whose names match :data:`ELEMENTWISE_NAMES` go to the element-wise group, as do 1-D ones.
    ``elementwise_overrides`` are extra keys for that group (``weight_decay=0.0``, say).
    """
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }
    hidden, rest, hidden_names, rest_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in embedding_ids and is_hidden_matrix(p, name):
            hidden.append(p)
            hidden_names.append(name)
        else:
            rest.append(p)
            rest_names.append(name)
    groups = []
    if hidden:
        groups.append({"params": hidden, "param_names": hidden_names})
    if rest:
        groups.append(
            {"params": rest, "param_names": rest_names, "ortho_mode": None, **elementwise_overrides}
        )
    return groups
