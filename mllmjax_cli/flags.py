"""Command-line options derived from the settings, so each default and help is written once.

Every field of `GRPOConfig` (the shared `mllmjax.settings.Settings` plus the device settings) is a
setting; its flag is the field name with dashes (`max_new_tokens` -> `--max-new-tokens`), its help and
default the field's. A command names the settings it takes with `with_settings`; where it needs another
default for the same idea, it declares an `Override` next to its own code, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from mllmjax.grpo.config import GRPOConfig

F = TypeVar("F", bound=Callable[..., Any])

FIELDS = {f.name: f for f in dataclasses.fields(GRPOConfig)}
_TYPES = typing.get_type_hints(GRPOConfig)
SHORT = {"group_size": "-G"}  # one-letter aliases


@dataclasses.dataclass(frozen=True)
class Override:
    """A command's own default for a setting, with the help that explains it (default: the field's) and
    its type where the default changes it (e.g. None for "decided later")."""

    default: Any
    help: str | None = None
    type: Any = None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _repeatable(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple


def _parameter(name: str, override: Override | None) -> inspect.Parameter:
    field = FIELDS[name]
    kind, default, help = _TYPES[name], field.default, field.metadata["help"]
    if override is not None:
        default, help = override.default, override.help or help
        kind = override.type or kind
    if _repeatable(kind):  # Typer collects a repeated option as a list; None when not given
        kind, default = list[typing.get_args(kind)[0]] | None, None
    names = (SHORT[name], flag_name(name)) if name in SHORT else (flag_name(name),)
    if kind is bool:  # --x/--no-x: a recipe or config file that turns one on can be overridden
        names = (f"{flag_name(name)}/--no-{name.replace('_', '-')}",)
    annotation = Annotated[kind, typer.Option(*names, help=help)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_settings(*names: str, **overrides: Override) -> Callable[[F], F]:
    """Give a Typer command one option per setting in `names` (`overrides`: the command's own defaults).

    The command takes them as `**settings`, repeatable ones as tuples. In the help they follow the
    command's required parameters and precede its other options."""
    unknown = [n for n in (*names, *overrides) if n not in FIELDS]
    if unknown or set(overrides) - set(names):
        raise ValueError(f"not settings of this command: {unknown or sorted(set(overrides) - set(names))}")

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        required = [p for p in own if p.default is inspect.Parameter.empty]
        optional = [p for p in own if p.default is not inspect.Parameter.empty]
        added = [_parameter(n, overrides.get(n)) for n in names]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            settings = {n: kwargs.pop(n) for n in names}
            for n in names:
                if _repeatable(_TYPES[n]):
                    settings[n] = tuple(settings[n] or ())
            return fn(*args, **kwargs, **settings)

        positional = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in (*required, *optional)]
        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*positional[: len(required)], *added, *positional[len(required) :]]
        )
        return command  # type: ignore[return-value]

    return decorate


def flags_given(ctx: typer.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings the user typed (not defaulted), so that they override a config file."""
    # By name: typer vendors its own copy of click, so its enum is not click's.
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return {n: v for n, v in settings.items() if getattr(ctx.get_parameter_source(n), "name", None) in typed}
