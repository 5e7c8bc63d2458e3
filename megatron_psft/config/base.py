"""What every configuration section shares: fields that know their flag, checks that name it, and a
plain-dict form.

A field's *key* is its name in Megatron's flag style (``micro_batch_size``), unique across the whole
configuration; its *flag* is ``--micro-batch-size`` unless the field says otherwise. Checks raise
:class:`ConfigError` naming the flag, so the same message serves the command line and Python callers.
"""

import dataclasses
from typing import Any, Dict, Optional, Type, TypeVar

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot run; the message names the flags."""


def setting(default: Any = None, *, flag: Optional[str] = None, key: Optional[str] = None) -> Any:
    """A dataclass field whose flag (or key, when it differs from the field's name) is given."""
    metadata = {name: value for name, value in (("flag", flag), ("key", key)) if value}
    return dataclasses.field(default=default, metadata=metadata)


def key_of(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name)


def flag_of(section_type: type, name: str) -> str:
    field = {f.name: f for f in dataclasses.fields(section_type)}[name]
    return field.metadata.get("flag", "--" + key_of(field).replace("_", "-"))


class Section:
    """Base of the frozen configuration dataclasses."""

    def flag(self, name: str) -> str:
        return flag_of(type(self), name)

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    def at_least(self, name: str, minimum: float, optional: bool = False) -> None:
        """`name` is at least `minimum` (or None, when `optional`)."""
        value = getattr(self, name)
        if not (optional and value is None):
            self.require(value is not None and value >= minimum, f"{self.flag(name)} must be at least {minimum}, got {value}")

    def non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self.require(value >= 0, f"{self.flag(name)} must not be negative, got {value}")

    def positive(self, name: str, optional: bool = False) -> None:
        value = getattr(self, name)
        if not (optional and value is None):
            self.require(value is not None and value > 0, f"{self.flag(name)} must be positive, got {value}")

    def to_dict(self) -> Dict[str, Any]:
        """The fields by key, as plain JSON values (tuples as lists)."""
        return {key_of(f): _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: Type[T], values: Dict[str, Any]) -> T:
        """The section of :meth:`to_dict`'s output (or any mapping by key; missing keys take defaults)."""
        known = {key_of(f): f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no settings {sorted(unknown)}")
        return cls(**{known[key].name: _as_tuple(value) for key, value in values.items()})

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Section):
        return value.to_dict()
    return value


def _as_tuple(value):
    """JSON lists back into the tuples the frozen fields hold."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value
