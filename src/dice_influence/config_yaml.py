"""Reading config files safely: YAML with limits on size, depth, aliases, expansion and integer
length, duplicate keys refused, UTF-8 only; errors never echo the input. :class:`ConfigError` is
the one error a bad configuration raises (re-exported by :mod:`dice_influence.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


MAX_CONFIG_BYTES = 1 << 20  # configs are a few KiB; a larger file is not a config
MAX_DEPTH = 64  # nesting levels of mappings/lists
MAX_ALIASES = 100
MAX_VALUES = 200_000  # scalars after expanding aliases (a "billion laughs" file expands to 10^9)
MAX_INT_DIGITS = 40


def short_repr(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters (an error never prints a whole input)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = r.maxtuple = 6
    r.maxlevel = 3
    text = r.repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """SafeLoader with limits: duplicate keys, nesting depth, alias count, expanded size and
    integer length are refused (each a :class:`yaml.YAMLError` with the line)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name); write the values out",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DEPTH} levels deep",
                self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are resolved by PyYAML itself
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)} (first on line "
                    f"{seen[key].line + 1}); the later one would silently replace it",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer with {digits} digits; no setting needs more than "
                f"{MAX_INT_DIGITS}", node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Scalars in ``node`` with every alias expanded (shared nodes counted each time)."""
    got = memo.get(id(node))
    if got is not None:
        return got
    if isinstance(node, yaml.ScalarNode):
        size = 1
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    memo[id(node)] = size
    return size


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` with :class:`_Loader`'s limits; :class:`ConfigError` naming
    ``where`` and the line on any problem."""
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_VALUES:
            raise ConfigError(f"{where}: expands to {size} values (aliases of aliases?); a "
                              f"config has at most {MAX_VALUES}")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML: {str(problem)[:200]}{at}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: Path) -> Any:
    """The YAML document in ``path``: at most 1 MiB of UTF-8 text (a UTF-16 file or invalid
    UTF-8 is named as such), parsed by :func:`safe_yaml`."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {size} bytes; a config is at most "
                              f"{MAX_CONFIG_BYTES} bytes (is it the right file?)")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and b"\x00" in data[:4]):
        raise ConfigError(f"{path} is saved as UTF-16 (or UTF-32); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}, line {line}: "
                          f"{data[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    return safe_yaml(text, str(path))


