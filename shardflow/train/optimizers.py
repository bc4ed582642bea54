"""Optimizers for a run: names, construction with the right process group, state-size table."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from shardflow.train.config import ConfigError, GroupRule, OptimConfig, _nearest
from shardflow.train.groups import RoutedGroup

STATE_BYTES_PER_PARAM: dict[str, float] = {
    "adamw": 8.0,
    "dolphinflow": 8.0,
    "whiteflow": 4.0,
    "factored_adam": 0.2,
    "dolphinflow8bit": 2.0,
}
"""Optimizer state per parameter (bytes), for optimizers that do not measure their own with a
``state_bytes_per_param()`` method (torch's AdamW); unknown names get 8."""

ORTHOGONALIZING = {"dolphinflow", "dolphinflow8bit", "whiteflow"}
"""Optimizers that orthogonalize 2-D updates (their matrices get Newton-Schulz owner ranks)."""


def known_optimizers() -> list[str]:
    """Names the registry accepts: ``shardflow.optim`` registers every built-in optimizer when
    imported (DolphinFlow8bit by a factory that imports it, and bitsandbytes, on first use)."""
    import shardflow.optim  # noqa: F401 - registers the built-in optimizers
    from shardflow.optim.registry import optimizer_names

    return optimizer_names()


def check_optimizer_name(name: str) -> None:
    """Raise :class:`ConfigError` for an optimizer name the registry does not know."""
    names = known_optimizers()
    if name.lower() not in names:
        import difflib

        near = difflib.get_close_matches(name.lower(), names, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"optim.name={name!r} is not a known optimizer.{hint} Known: {names}.")


def _factory(name: str) -> Any:
    from shardflow.optim import registry

    getter = getattr(registry, "get_optimizer_factory", None)
    return getter(name) if getter else registry._REGISTRY[name.lower()]


@functools.cache
def optimizer_class(name: str) -> Any:
    """The class ``name`` builds: the factory itself, or (a lazy factory function) the type of
    what it returns for one 2x2 parameter."""
    factory = _factory(name)
    if isinstance(factory, type):
        return factory
    return type(factory([torch.nn.Parameter(torch.zeros(2, 2))], lr=1e-3))


_UNKNOWN = inspect.Parameter("unknown", inspect.Parameter.KEYWORD_ONLY)


def _find_parameter(name: str, key: str) -> inspect.Parameter | None:
    """Constructor parameter ``key`` of optimizer ``name``: in its ``__init__``, or in a base
    class's when ``**kwargs`` are passed on (up the MRO); None when it takes no such keyword."""
    for cls in optimizer_class(name).__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        try:
            params = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            return _UNKNOWN
        if key in params:
            return params[key]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
    return None


def option_names(name: str) -> list[str]:
    """Every keyword optimizer ``name``'s constructor takes (up the MRO while ``**kwargs`` are
    passed on), for naming the nearest valid one."""
    names: set[str] = set()
    for cls in optimizer_class(name).__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        try:
            params = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            break
        names |= {
            k
            for k, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in ("self", "params")
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return sorted(names)


@functools.cache
def group_keys(name: str) -> tuple[str, ...]:
    """The param-group keys of optimizer ``name`` (those of one built over a small parameter)."""
    built = _factory(name)([torch.nn.Parameter(torch.zeros(2, 2))], lr=1e-3)
    return tuple(sorted({k for g in built.param_groups for k in g} - {"params"}))


def _eager_optimizers() -> list[str]:
    """Registered optimizers that are classes (cheap to build; a lazy factory, such as
    DolphinFlow8bit's, would import its extra)."""
    return [n for n in known_optimizers() if isinstance(_factory(n), type)]


def groups_for(
    name: str, rules: list[GroupRule], names: list[str]
) -> tuple[list[GroupRule], list[str]]:
    """``rules`` with only the keys optimizer ``name`` takes (compare: a group key goes to the
    optimizers of ``names`` that take it), and one note per key that none of ``names`` takes
    (dropped for every run; the note names the nearest valid key)."""
    kept, notes = [], []
    for i, rule in enumerate(rules):
        options = {k: v for k, v in rule.options.items() if k in group_keys(name)}
        kept.append(GroupRule(pattern=rule.pattern, options=options))
        for key in rule.options:
            if not any(key in group_keys(n) for n in names):
                valid = sorted({k for n in names for k in group_keys(n)})
                notes.append(
                    f"optim.groups[{i}].{key} is a param-group key of none of {names}; "
                    f"dropped.{_nearest(key, valid)}"
                )
    return kept, notes


def accepts_option(name: str, key: str) -> bool:
    """Whether optimizer ``name``'s constructor takes the keyword ``key``."""
    return _find_parameter(name, key) is not None


def accepts_process_group(name: str) -> bool:
    """Whether the optimizer's constructor takes ``process_group=`` (ShardFlow ones do)."""
    return accepts_option(name, "process_group")


def default_option(name: str, key: str) -> Any:
    """The constructor default of ``key`` for optimizer ``name`` (None when it has none)."""
    param = _find_parameter(name, key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def clips_itself(name: str) -> bool:
    """Whether optimizer ``name`` clips the global gradient norm itself (its constructor takes
    ``gradient_clipping``: every ShardFlow optimizer); otherwise the training loop clips."""
    return accepts_option(name, "gradient_clipping")


def state_bytes_per_param(name: str, optimizer: Any = None) -> float:
    """Bytes of optimizer state per parameter: ``optimizer.state_bytes_per_param()`` where the
    built optimizer has that method (ShardFlow optimizers measure their state), else the table."""
    own = getattr(optimizer, "state_bytes_per_param", None)
    if callable(own):
        return float(own())
    return STATE_BYTES_PER_PARAM.get(name.lower(), 8.0)


def build_run_optimizer(
    cfg: OptimConfig,
    groups: list[RoutedGroup],
    process_group: Any = None,
    *,
    grads_reduced: bool = False,
) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups``.

    ``optim.grad_clip`` becomes ``gradient_clipping`` where the optimizer takes it (0: None, off);
    ``process_group`` goes only where it is accepted, and with it ``grads_reduced`` (True for a
    DDP-wrapped model: the gradients are already averaged).
    """
    from shardflow.optim.registry import build_optimizer

    hyper = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **cfg.hyper}
    if clips_itself(cfg.name):
        if "gradient_clipping" in cfg.hyper:
            raise ConfigError(
                f"optim.hyper.gradient_clipping={cfg.hyper['gradient_clipping']!r} is set, but "
                f"optim.grad_clip={cfg.grad_clip!r} is what {cfg.name} gets as gradient_clipping; "
                "remove optim.hyper.gradient_clipping and set optim.grad_clip (0 = no clipping)."
            )
        hyper["gradient_clipping"] = cfg.grad_clip if cfg.grad_clip > 0 else None
    if process_group is not None and accepts_process_group(cfg.name):
        hyper["process_group"] = process_group
        if grads_reduced and accepts_option(cfg.name, "grads_reduced"):
            hyper["grads_reduced"] = True
    param_groups = [g.as_param_group() for g in groups]
    try:
        return build_optimizer(cfg.name, param_groups, **hyper)
    except TypeError as exc:
        raise ConfigError(
            f"optim.name={cfg.name!r} rejected its arguments ({exc}); check [optim.hyper] and "
            "the keys of [[optim.groups]]."
        ) from exc


def _tiny_groups(groups: list[RoutedGroup], with_options: bool) -> list[RoutedGroup]:
    """``groups`` with one small parameter per distinct (ndim, dtype) of their parameters."""
    tiny = []
    for g in groups:
        kinds = sorted({(p.ndim, p.dtype) for p in g.params}, key=str)
        params = [torch.nn.Parameter(torch.zeros((4,) * nd, dtype=dt)) for nd, dt in kinds]
        options = dict(g.options) if with_options else {}
        tiny.append(
            RoutedGroup(g.index, g.pattern, options, [f"p{i}" for i in range(len(params))], params)
        )
    return tiny


def check_optimizer(cfg: OptimConfig, groups: list[RoutedGroup]) -> None:
    """Raise :class:`ConfigError` unless optimizer ``cfg.name`` takes ``cfg``'s arguments and
    ``groups``' keys and values: every ``[optim.hyper]`` key is a constructor argument, every
    ``[[optim.groups]]`` key is one of its param-group keys, and the constructor accepts the
    values (it is built once over small stand-in parameters of the groups' shapes and dtypes,
    on the CPU, before any process group starts). Each unknown key names the nearest valid one.
    """
    for key in cfg.hyper:
        if not accepts_option(cfg.name, key):
            raise ConfigError(
                f"optim.hyper.{key} is not an argument of {cfg.name}."
                f"{_nearest(key, option_names(cfg.name))}"
            )

    def build(tiny: list[RoutedGroup], where: str) -> torch.optim.Optimizer:
        try:
            return build_run_optimizer(cfg, tiny)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{where}: {cfg.name} refused a value: {exc}") from exc

    build(_tiny_groups(groups, with_options=False), "[optim] / [optim.hyper]")
    valid = list(group_keys(cfg.name))
    for g in groups:
        for key in g.options:
            if key in valid:
                continue
            others = [n for n in _eager_optimizers() if key in group_keys(n)]
            hint = (
                f" Only {', '.join(others)} take it; remove it from that group (or drop every "
                "group: --optim.groups '[]')."
                if others
                else _nearest(key, valid)
            )
            raise ConfigError(
                f"optim.groups[{g.index}].{key} is not a param-group key of {cfg.name}.{hint}"
            )
    if any(g.options for g in groups):
        build(_tiny_groups(groups, with_options=True), "[[optim.groups]]")
