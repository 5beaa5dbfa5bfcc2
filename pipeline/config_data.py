"""A config someone else wrote (a run's config.json, a bundle's inference.json), read as data:
``@`` references are followed, ``$`` / ``%`` expressions and ``_target_`` objects are refused,
never evaluated (``trust=True`` in the callers evaluates a file the user wrote with MONAI).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from typing import Any

from pipeline.io_utils import TokenizerError

__all__ = ["TRUST_HINT", "config_flag", "config_value", "last_line", "setting_hint"]

TRUST_HINT = "write plain values, or pass --trust-bundle (trust=True) if you wrote this file yourself"


def setting_hint(key: str, json_value: str) -> str:
    """How to set config ``key`` to ``json_value`` (JSON text) on the command line in use:
    ``--override KEY=VALUE`` under ``./run.sh train`` (which sets ``CTVQ_COMMAND``), else ``--KEY
    VALUE`` as ``python -m monai.bundle run`` reads it (through Fire: Python literals, so ``False``,
    and a string as it is)."""
    if os.environ.get("CTVQ_COMMAND"):
        return f"--override {shlex.quote(f'{key}={json_value}')}"
    value = json.loads(json_value)
    return f"--{key} {shlex.quote(value if isinstance(value, str) else repr(value))}"


def config_flag(key: str, value: Any, config_key: str | None = None) -> bool:
    """``value`` of the true/false setting ``key``; anything else (a string "false", 0) is refused in
    one line naming ``config_key`` (the config key that sets it; default ``key``), since Python would
    read most of those as true."""
    if isinstance(value, bool):
        return value
    config_key = config_key or key
    raise ValueError(needs_flag(f"{config_key}={value!r}", config_key))


def needs_flag(where: str, key: str) -> str:
    """The one-line refusal of a value given where the config key ``key`` takes true or false, in the
    spelling of the command line in use (see :func:`setting_hint`)."""
    spelling = "true or false (JSON)" if os.environ.get("CTVQ_COMMAND") else "True or False (Python, as MONAI's runner reads it)"
    return f"{where}: needs {spelling}, e.g. {setting_hint(key, 'false')}"


def last_line(e: BaseException) -> str:
    """Last line of an exception's message (ConfigParser errors end with the cause), or its type name."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__



def _lookup(cfg: Mapping, ref: str) -> Any:
    node: Any = cfg
    for part in ref.replace("::", "#").split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node


def config_value(cfg: Mapping, key: str, source: Any = "config", depth: int = 0) -> Any:
    """``cfg[key]`` read as data: ``@`` references to other keys are followed, ``$`` / ``%``
    expressions and nested ``_target_`` objects are refused (never evaluated).

    Args:
        cfg: config dict (a run's config.json or a bundle's inference.json).
        key: key path (``a#b`` for nesting).
        source: where the config came from (for error messages).
    """
    try:
        node = _lookup(cfg, key)
    except KeyError:
        raise TokenizerError(f"{source}: has no '{key}'; use a run config.json or a bundle's configs/inference.json") from None

    def plain(v: Any, where: str, depth: int) -> Any:
        if depth > 20:
            raise TokenizerError(f"{source}: '{where}' refers to itself through @ references; write its value")
        if isinstance(v, str) and v.startswith("@"):
            return config_value(cfg, v[1:], source, depth + 1)
        if isinstance(v, str) and v.startswith(("$", "%")):
            raise TokenizerError(f"{source}: '{where}' is an expression ({v[:40]!r}), which is not run from a file; {TRUST_HINT}")
        if isinstance(v, Mapping):
            if "_target_" in v and where != "network_def":
                raise TokenizerError(f"{source}: '{where}' builds an object ({v['_target_']!r}), which is not run from a file; {TRUST_HINT}")
            return {str(k): plain(x, f"{where}#{k}", depth) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x, f"{where}#{i}", depth) for i, x in enumerate(v)]
        return v

    return plain(node, key, depth)
