"""The command line's parser: argparse with what every `erasure` subcommand promises.

- Every option has both spellings, `--output-dir` and `--output_dir` (recipe keys are written with
  underscores, shell flags usually with hyphens); help shows the first.
- Every option's help ends with its type and default, e.g. `[int; default: 0]`.

`erasure train` builds its flags from the recipe dataclass (erasure.config.build_parser) with the
same class, so its help reads the same way.
"""

from __future__ import annotations

import argparse
import copy

_NO_HELP = "(no help)"  # stands in for an empty help while formatting


def type_and_default(type_name: str, default) -> str:
    """The suffix every option's help ends with."""
    shown = "none" if default is None else default
    if isinstance(default, (list, tuple)):
        shown = " ".join(map(str, default)) or "none"
    return f"[{type_name}; default: {shown}]"


def _type_name(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "switch"
    if isinstance(action, argparse._AppendAction):
        return f"{getattr(action.type, '__name__', 'str')}, repeatable"
    name = getattr(action.type, "__name__", "str")
    return f"{name} list" if action.nargs in ("+", "*") else name


class HelpFormatter(argparse.HelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not (action.help or "").strip():
            # argparse writes no help line for an option without help; it still has a type and default
            action = copy.copy(action)
            action.help = _NO_HELP
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = "" if action.help == _NO_HELP else action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or action.dest == "help":
            return help_text
        if action.required:
            return f"{help_text} [{_type_name(action)}; required]".strip()
        if action.default is None and "default" in help_text:  # the help says what stands in for it
            return f"{help_text} [{_type_name(action)}]"
        return f"{help_text} {type_and_default(_type_name(action), action.default)}".strip()

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        # one spelling of each name: the other works too, and the description says so once
        names = list(dict.fromkeys(name.replace("_", "-") for name in action.option_strings))
        if action.nargs == 0:
            return ", ".join(names)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{name} {value}" for name in names)


def _other_spelling(name: str) -> str | None:
    if not name.startswith("--"):
        return None
    word = name[2:]
    other = word.replace("-", "_") if "-" in word else word.replace("_", "-")
    return None if other == word else "--" + other


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options answer to both spellings and whose help shows types and
    defaults; its subcommands are Parsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] += " Every --flag-name is also --flag_name."
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        spelled = list(names)
        for name in names:
            other = _other_spelling(name)
            if other and other not in spelled:
                spelled.append(other)
        return super().add_argument(*spelled, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)
