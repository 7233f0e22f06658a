"""Registries: the one place where a configurable choice is declared.

A Registry holds the values one configuration key accepts (`parallel.strategy`, `data.source`, ...): for each name,
what the name builds and one line of help. The module that implements the choices owns the registry and fills it
beside the implementations (`@STRATEGIES.register("ddp", "...")`), so a new choice is one decorated definition.
Everything else reads the names from there: the schema's validation and the configuration reference (through
`mokd.config.register_choices`), the builders (`get`), and the error for an unknown name, which is the same
everywhere: a ConfigError naming the key and the names it accepts.

Why this shape:
  * It imports nothing of mokd but the error types, so every layer (kernels, data, method, engine) can own a
    registry without importing another layer or the schema.
  * An entry is any value: a strategy registers a loader that imports its module only when the strategy is used
    (deepspeed stays an optional, lazy import), a data source a builder function, a backbone name its family,
    an optimiser a constructor. The registry fixes how names are declared and looked up, not what they build.
  * The schema learns the names and help through `helps`, a read-only live view handed to
    `mokd.config.register_choices` once, when the owning module is imported. A name registered later (a plugin,
    a test) is accepted by validation at once, and the schema never imports a component.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Generic, Mapping, TypeVar

from mokd.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """The names `key` accepts, each with what it builds and one line of help, in the order registered."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}
        self._helps: dict[str, str] = {}
        self.helps: Mapping[str, str] = MappingProxyType(self._helps)  # {name: help}, live

    def register(self, name: str, help: str) -> Callable[[T], T]:
        """Decorator: registers the decorated object under `name` and returns it unchanged."""
        def add(entry: T) -> T:
            self.add(name, entry, help)
            return entry
        return add

    def add(self, name: str, entry: T, help: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = entry
        self._helps[name] = help

    def remove(self, name: str) -> None:
        """Withdraws a name (a plugin replacing a choice, a test that registered one for a while)."""
        del self._entries[name], self._helps[name]

    def get(self, name: str) -> T:
        """The entry of `name`; an unknown name is a ConfigError naming the key and the accepted names."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"{self.key}={name!r} is not one of {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
