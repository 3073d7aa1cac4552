""""Did you mean ...?" for a configuration key that does not exist, on the command line and in a YAML file.

deepres parses with ``allow_abbrev=False``: ``--trainer.max_epoch 3`` is an error, not a silent
``--trainer.max_epochs 3`` (argparse's prefix matching would accept it today and take another key tomorrow, when
a longer option with the same prefix appears). jsonargparse's messages name the bad key; this module finds the
valid keys next to it and turns the message into one line with the nearest matches:

    unrecognized arguments: --trainer.max_epoch 3      -> --trainer.max_epoch is not an option; did you mean
                                                          --trainer.max_epochs?
    Group 'trainer' does not accept option 'max_epoch' -> trainer.max_epoch (in the config) is not a key; ...
    Option 'trainr.max_epochs' is not accepted         -> trainr is not a section; did you mean trainer?
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


def close(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The nearest candidates, best first; for an abbreviation, the keys it abbreviates."""
    pool = sorted({c for c in candidates if not c.endswith("+")})  # "key+": jsonargparse's append syntax
    prefixed = sorted((c for c in pool if c.startswith(word) and c != word), key=len)
    if prefixed:
        return prefixed[:n]
    # a key that moved into a group (`lr` -> `optim.lr`), or a near miss inside one (`optim.lrr`)
    moved = sorted(c for c in pool if c.rsplit(".", 1)[-1] == word and c != word)
    return moved[:n] or difflib.get_close_matches(word, pool, n=n, cutoff=0.75)


def _did_you_mean(found: list[str]) -> str:
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def parser_keys(parser: Any) -> set[str]:
    """Every dotted key a jsonargparse parser accepts (``trainer.max_epochs``, ``run.name``, ``config``, ...)."""
    keys = set()
    for option in getattr(parser, "_option_string_actions", {}):
        if option.startswith("--"):
            keys.add(option[2:])
    return keys


def class_keys(class_path: str) -> set[str]:
    """The init arguments of a class (and ``arg.field`` for a dataclass-typed argument), for ``model.`` keys."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return set()
    keys: set[str] = set()
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        init = getattr(klass, "__init__", None)
        try:
            signature = inspect.signature(init)
            hints = typing.get_type_hints(init)
        except (TypeError, ValueError, NameError):
            continue
        for param in signature.parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            keys.add(param.name)
            hint = hints.get(param.name)
            for arg in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(arg):
                    keys |= {f"{param.name}.{f.name}" for f in dataclasses.fields(arg)}
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            break  # no **kwargs: the base classes take nothing more
    return keys


def _config_files(argv: list[str]) -> list[Path]:
    files = []
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key == "--config":
            path = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if path and Path(path).is_file():
                files.append(Path(path))
    return files


def _file_with_key(argv: list[str], dotted: str) -> Path | None:
    """The --config file that holds the nested key ``a.b.c`` (to name it in the message)."""
    for path in _config_files(argv):
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _has_path(loaded, dotted.split(".")):
            return path
    return None


def _has_path(node: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def suggest(message: str, parser: Any, argv: list[str]) -> str | None:
    """One line with "did you mean" for a jsonargparse error about an unknown key; None if it is about no key."""
    keys = parser_keys(parser)
    unrecognized = re.match(r"unrecognized arguments: (.*)", message.strip())
    if unrecognized:
        options = [t.partition("=")[0] for t in unrecognized[1].split() if t.startswith("--")]
        unknown = [o for o in options if o[2:] not in keys] or options
        if not unknown:
            return None
        parts = []
        for option in unknown:
            found = close(option[2:], keys)
            parts.append(f"{option} is not an option{_did_you_mean(['--' + f for f in found])}")
        return "; ".join(parts) + ". Options are matched exactly, never by prefix."
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    if group:
        section, key = group[1], group[2]
        found = [f"{section}.{f}" for f in close(key, {k[len(section) + 1:] for k in keys
                                                        if k.startswith(section + ".")})]
        return _in_config(f"{section}.{key}", found, argv)
    option = (re.search(r"Option '([\w.]+)' is not accepted", message)
              or re.search(r"Subcommand '\w+' does not accept option '([\w.]+)'", message))
    if option:
        dotted = option[1]
        top = {k.split(".")[0] for k in keys}
        head = dotted.split(".")[0]
        if head not in top:
            found = close(head, top)
            where = where_in_config(argv, dotted)
            return f"{head}{where} is not a section{_did_you_mean(found)}."
        return _in_config(dotted, close(dotted, keys), argv)
    return None


def where_in_config(argv: list[str], dotted: str) -> str:
    path = _file_with_key(argv, dotted)
    return f" (in {path})" if path else ""


def _in_config(dotted: str, found: list[str], argv: list[str]) -> str:
    return f"{dotted}{where_in_config(argv, dotted)} is not a key{_did_you_mean(found)}."


def class_option_hint(section: str, class_path: str, option: str) -> str:
    """" (did you mean 'depth'?)" for ``model: <class> has no option 'dpeth'`` (empty when nothing is near)."""
    return _did_you_mean([repr(f) for f in close(option, class_keys(class_path))])


def field_choices(class_path: str, dotted: str) -> tuple[str, ...]:
    """The fixed choices of a class's argument or of a field of its config groups (``optim.name`` of the
    Classifier: sgd, adamw, adam), from its Literal type; () when it has none."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls.__init__)
    except (ImportError, AttributeError, ValueError, TypeError, NameError):
        return ()
    head, _, rest = dotted.partition(".")
    hint = hints.get(head)
    if rest:
        group = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        hint = typing.get_type_hints(group).get(rest) if group is not None else None
    return _literal_values(hint)


def _literal_values(hint: Any) -> tuple[str, ...]:
    if typing.get_origin(hint) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(hint))
    return tuple(v for arg in typing.get_args(hint) for v in _literal_values(arg))


def choice_hint(section: str, class_path: str, dotted: str, value: str) -> str | None:
    """One line for a value outside a field's fixed choices: the choices, and the nearest one."""
    choices = field_choices(class_path, dotted)
    if not choices:
        return None
    near = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return (f"--{section}.{dotted} {value!r} is not one of {', '.join(choices)}"
            f"{' (did you mean ' + repr(near[0]) + '?)' if near else ''}.")
