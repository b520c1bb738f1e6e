"""Settings that travel from one process to another as environment variables, declared once.

A process's settings are a msgspec Struct whose every field names its variable:

    port: Annotated[int, Var("SIDECAR_PORT", supervisor=True)]

That one table (field, variable, type, default) gives `from_env()` (the process reads
what it was given), `to_env()` (the supervisor writes what it decided) and
`env_names()` (e.g. what a service's `sidecar_env` may not override), so the three
cannot drift apart. Values read as the processes always read them:

- a field without a default is required: absent or empty, a SettingsError;
- str: absent, the default; present, as given (even empty);
- int, float: parsed; anything else is a SettingsError naming the variable, never a
  traceback;
- bool: only the text that turns the default around counts: "1" switches on a field
  that is off by default, "0" switches off one that is on;
- any other type: `Var(parse=..., format=...)`; parse raises ValueError to refuse.

`to_env()` writes every required field and every field the supervisor sets, and any
other field only where it differs from its default: the variables the supervisor does
not set (a sidecar's timeouts, say) stay the operator's, from the environment beneath.
`from_env(s.to_env()) == s` for every `s`.
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec

from shared.mesh.naming import node_name, service_id


class SettingsError(Exception):
    """A missing or unreadable variable; str() is the whole message for the operator."""


@dataclass(frozen=True)
class Var:
    """How one field travels: its variable and whether the supervisor sets it."""

    name: str
    # Set by the supervisor for every instance: always written by to_env(), and not the
    # operator's to override.
    supervisor: bool = False
    parse: Callable[[str], Any] | None = None
    format: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class _Field:
    attr: str
    var: Var
    default: Any  # msgspec.NODEFAULT: required
    parse: Callable[[str], Any]
    format: Callable[[Any], str]
    number: bool  # a refused value reads "NAME='x' is not a number"

    @property
    def required(self) -> bool:
        return self.default is msgspec.NODEFAULT


def _codec(kind: Any, var: Var, default: Any) -> tuple[Callable[[str], Any], Callable[[Any], str]]:
    if var.parse is not None and var.format is not None:
        return var.parse, var.format
    if kind is bool:
        if default is True:
            return (lambda text: text != "0"), (lambda value: "1" if value else "0")
        return (lambda text: text == "1"), (lambda value: "1" if value else "")
    if kind in (str, int, float):
        return kind, str
    raise TypeError(f"{var.name}: a {kind!r} field needs Var(parse=..., format=...)")


def _field(info: msgspec.structs.FieldInfo) -> _Field:
    if typing.get_origin(info.type) is not typing.Annotated:
        raise TypeError(f"field {info.name} names no variable: Annotated[type, Var(...)]")
    kind, *extras = typing.get_args(info.type)
    var = next((extra for extra in extras if isinstance(extra, Var)), None)
    if var is None:
        raise TypeError(f"field {info.name} names no variable: Annotated[type, Var(...)]")
    default = info.default
    if info.default_factory is not msgspec.NODEFAULT:
        default = info.default_factory()
    parse, format_ = _codec(kind, var, default)
    return _Field(info.name, var, default, parse, format_, kind in (int, float))


@functools.cache
def _table(cls: type[EnvStruct]) -> tuple[_Field, ...]:
    return tuple(_field(info) for info in msgspec.structs.fields(cls))


class EnvStruct(msgspec.Struct, kw_only=True):
    """Base of settings read from the environment; subclasses annotate each field with a Var."""

    component: ClassVar[str] = "settings"  # starts every SettingsError message

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None):
        """The settings in `env` (os.environ by default); SettingsError if one is missing or bad."""
        return cls(**cls.read(os.environ if env is None else env))

    @classmethod
    def read(cls, env: Mapping[str, str], *fields: str) -> dict[str, Any]:
        """The named fields (all when none are named) found in `env`, parsed; a field whose
        variable is absent is left out, for its default to apply."""
        unknown = set(fields) - {f.attr for f in _table(cls)}
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for f in _table(cls):
            if fields and f.attr not in fields:
                continue
            text = env.get(f.var.name)
            if f.required and not text:
                raise SettingsError(f"{cls.component}: environment variable {f.var.name} is required")
            if text is None:
                continue
            try:
                values[f.attr] = f.parse(text)
            except ValueError as exc:
                problem = f"={text!r} is not a number" if f.number else f" {exc}"
                raise SettingsError(f"{cls.component}: {f.var.name}{problem}") from None
        return values

    def to_env(self) -> dict[str, str]:
        """The variables that give these settings to a process started with them."""
        env: dict[str, str] = {}
        for f in _table(type(self)):
            value = getattr(self, f.attr)
            if f.var.supervisor or f.required or value != f.default:
                env[f.var.name] = f.format(value)
        return env

    @classmethod
    def env_names(cls, *, supervisor: bool | None = None) -> frozenset[str]:
        """The variables of these settings: all, or those the supervisor sets (or does not)."""
        return frozenset(f.var.name for f in _table(cls) if supervisor is None or f.var.supervisor == supervisor)


class InstanceSettings(EnvStruct, kw_only=True):
    """What every instance of the mesh (the gateway, a sidecar) is told about itself."""

    service: Annotated[str, Var("SERVICE_NAME", supervisor=True)]
    index: Annotated[int, Var("INSTANCE_INDEX", supervisor=True)] = 1
    service_id: Annotated[str, Var("SERVICE_ID", supervisor=True)] = ""  # "": from the node name
    node: Annotated[str, Var("CONSUL_NODE")] = ""  # "": the host name (shared.mesh.naming)
    # From [consul], for every process.
    consul_address: Annotated[str, Var("CONSUL_HTTP_ADDR", supervisor=True)] = "127.0.0.1:8500"
    consul_token: Annotated[str, Var("CONSUL_HTTP_TOKEN", supervisor=True)] = ""
    # From [mesh] mtls: Connect identities, mTLS between mesh members, intentions.
    mtls: Annotated[bool, Var("MESH_MTLS", supervisor=True)] = True

    def __post_init__(self) -> None:
        if not self.service_id:
            self.service_id = service_id(self.service, node_name(self.node), self.index)

    @property
    def instance(self) -> str:
        return f"{self.service}.{self.index}"
