"""Name -> (mixer class, config dataclass).

Built-in mixers register themselves with :func:`register_mixer` when ``arch_zoo.mixers`` is imported.
Third-party packages plug in through the entry-point group ``arch_zoo.mixers``; each entry point names a module or
a mixer class, and loading it registers the mixer (by the decorator, or under the entry point's name). Plugins are
discovered lazily: only when a name is not found among the loaded mixers, or when the full list is asked for.
A plugin that fails to import is set aside with its error (:func:`broken_plugins`): the others and the built-ins
still work, and asking for its name says why it is missing.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer

ENTRY_POINT_GROUP = "arch_zoo.mixers"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixerSpec:
    name: str
    mixer_class: type[TokenMixer]
    config_class: type[MixerConfig]
    source: str  # "builtin" or the plugin's distribution / entry point
    alias_of: str | None = None  # an older name kept working (configs, sweeps, the labels of recorded runs)


_MIXERS: dict[str, MixerSpec] = {}
_BROKEN: dict[str, str] = {}  # entry-point name -> why it failed to import
_plugins_loaded = False
_builtins_loaded = False
_loading_source = "builtin"


class UnknownMixerError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_mixer(
    name: str, config_class: type[MixerConfig] | None = None, aliases: tuple[str, ...] = ()
) -> Callable[[type], type]:
    """Class decorator: bind ``name`` to a :class:`TokenMixer` subclass and its config dataclass.

    The config class defaults to the mixer's ``config_class`` attribute. ``aliases`` are former names that keep
    selecting the same mixer; a config made under one keeps that name, so a run is recorded as it was asked for.
    """

    def decorate(mixer_class: type[TokenMixer]) -> type[TokenMixer]:
        cfg = config_class or getattr(mixer_class, "config_class", None)
        if cfg is None or not (dataclasses.is_dataclass(cfg) and issubclass(cfg, MixerConfig)):
            raise TypeError(f"mixer {name!r}: config class must be a dataclass subclassing MixerConfig")
        mixer_class.config_class = cfg
        for key in (name, *aliases):
            if key in _MIXERS and _MIXERS[key].mixer_class is not mixer_class:
                raise ValueError(f"mixer name {key!r} is already registered by {_MIXERS[key].mixer_class}")
            _MIXERS[key] = MixerSpec(key, mixer_class, cfg, _loading_source, None if key == name else name)
        return mixer_class

    return decorate


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("arch_zoo.mixers")


def mixer_origin(name: str) -> dict[str, str]:
    """Where a registered mixer comes from: for an entry point, its ``distribution``, ``version`` and
    ``entry_point``; for a built-in, ``{"distribution": "built-in"}``. Runs record it, so a table row says which
    release of a plugin made it."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            dist = ep.dist
            return {
                "distribution": dist.metadata["Name"] if dist is not None else "unknown",
                "version": dist.version if dist is not None else "unknown",
                "entry_point": ep.value,
            }
    return {"distribution": "built-in"}


def load_plugins(force: bool = False) -> None:
    """Import every entry point of the group ``arch_zoo.mixers`` (once, unless ``force``)."""
    global _plugins_loaded, _loading_source
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _MIXERS and not force:
            continue
        _loading_source = f"plugin {ep.value}"
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not hide the others
            _BROKEN[ep.name] = f"{ep.value} failed to import: {type(err).__name__}: {err}"
            log.warning("mixer plugin %r is broken and left out: %s", ep.name, _BROKEN[ep.name])
            continue
        finally:
            _loading_source = "builtin"
        _BROKEN.pop(ep.name, None)
        if ep.name not in _MIXERS and isinstance(obj, type) and issubclass(obj, TokenMixer):
            _MIXERS[ep.name] = MixerSpec(ep.name, obj, obj.config_class, f"plugin {ep.value}")


def available_mixers() -> dict[str, MixerSpec]:
    """Every registered name, plugins and aliases included (``spec.alias_of`` tells an alias), sorted by name."""
    _load_builtins()
    load_plugins()
    return dict(sorted(_MIXERS.items()))


def broken_plugins() -> dict[str, str]:
    """Plugins of the entry-point group that failed to import: name -> the error."""
    _load_builtins()
    load_plugins()
    return dict(sorted(_BROKEN.items()))


def get_mixer(name: str) -> MixerSpec:
    _load_builtins()
    if name not in _MIXERS:
        load_plugins()
    if name in _BROKEN and name not in _MIXERS:
        raise ConfigError(
            f"mixer {name!r} comes from a plugin that is broken: {_BROKEN[name]}. "
            f"Fix or reinstall the package that provides it, or choose another with model/mixer=NAME."
        )
    if name not in _MIXERS:
        known = sorted(_MIXERS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMixerError(
            f"unknown mixer {name!r}.{hint} Registered mixers: {', '.join(known)}. "
            f"Choose one with model/mixer=NAME, or install a plugin that registers {name!r} "
            f"under the entry-point group {ENTRY_POINT_GROUP!r}."
        )
    return _MIXERS[name]


def make_config(spec: MixerConfig | Mapping[str, Any] | str) -> MixerConfig:
    """Turn a mixer name, a dict (e.g. from Hydra) or a config instance into a typed config instance."""
    if isinstance(spec, MixerConfig):
        if not spec.name:
            for entry in available_mixers().values():
                if type(spec) is entry.config_class:
                    return dataclasses.replace(spec, name=entry.name)
            raise ConfigError(f"{type(spec).__name__} is not the config class of any registered mixer")
        get_mixer(spec.name)
        return spec
    if isinstance(spec, str):
        return get_mixer(spec).config_class(name=spec)
    values = dict(spec)
    name = values.get("name")
    if not name:
        raise ConfigError("a mixer config needs a 'name' field; choose one with model/mixer=NAME")
    entry = get_mixer(name)
    valid = {f.name for f in dataclasses.fields(entry.config_class)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(
            f"mixer {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(sorted(valid))}"
        )
    return entry.config_class(**values)


def mixer_class(name: str) -> type[TokenMixer]:
    """The class registered under ``name`` (an alias included)."""
    return get_mixer(name).mixer_class


def build_mixer(spec: MixerConfig | Mapping[str, Any] | str, d_model: int, layer_idx: int = 0) -> TokenMixer:
    """One mixer from a name, a dict or a config (its constructor checks the config)."""
    config = make_config(spec)
    return mixer_class(config.name)(d_model, config, layer_idx)
