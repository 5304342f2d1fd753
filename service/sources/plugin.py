"""The plugin source: runs a user function in a worker process.

    [[sources]]
    kind = "plugin"
    target = "mypackage.mymodule:produce"   # "module:function" (function may be dotted)
    options = { anything = "the function gets" }

The worker imports the module and calls ``function(ring, options)``, where
`ring` is a producer handle and `options` the table above. If the function
also takes a `stop` parameter it gets the worker's StopFlag (`stop.is_set()`,
`stop.wait(seconds)`) and should return soon after SIGTERM sets it; if it
does not, SIGTERM raises an exception inside it instead (a `with
ring.reserve(n)` block then discards its record). A parameter named
`instance` gets the worker's instance index. When the function returns or
raises, the worker exits and the supervisor restarts it after a backoff.

What to write: framed records (service.record.pack_header + the fields of a
schema) are decoded by the service when their type is in a schema file
([schemas] files); any other bytes, and framed records of an unknown type,
are delivered raw (base64). See service/sources/example_plugin.py.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import ringcore
from service.workers import SourceConfigError, StopFlag


class PluginError(SourceConfigError):
    """The plugin target cannot be imported or is not a function."""


def resolve(target: str) -> Callable[..., object]:
    """The callable `target` ("module:function") names; PluginError naming it otherwise."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f'plugin target {target!r}: must be "module:function"')
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        # whatever the module raised on import (a missing dependency, a syntax
        # error, its own code failing) is a reason it cannot run
        raise PluginError(
            f"plugin target {target!r}: cannot import module {module_name!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(
                f"plugin target {target!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise PluginError(
            f"plugin target {target!r}: {attr!r} is a {type(obj).__name__}, not a function"
        )
    return obj  # type: ignore[no-any-return]


def _accepts(fn: Callable[..., object], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def run(ring: ringcore.Ring, options: Mapping[str, Any], *, instance: int, stop: StopFlag) -> None:
    fn = resolve(options["target"])
    if stop.is_set():  # SIGTERM came while the plugin was being imported
        return
    kwargs: dict[str, Any] = {}
    if _accepts(fn, "instance"):
        kwargs["instance"] = instance
    if _accepts(fn, "stop"):
        kwargs["stop"] = stop
    else:
        stop.interrupt = True
    fn(ring, dict(options.get("options", {})), **kwargs)
