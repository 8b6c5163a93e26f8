"""The recipes, evaluation suites and concept specs that ship with the package.

`recipes/`, `eval/` and `prompts/` are data the commands read, so they live here, inside the
package, and a wheel (`pip install .`) carries them; a checkout's top-level folders of the same
names are links to these. A user names them by their documented paths (`recipes/tiny/rgd.yaml`,
`eval/micro-striped.yaml`, `prompts/nudity.yaml`): a path that exists is read as given, and one
that does not but starts with one of the three folders is read from the shipped copy, so the
documented commands work from any folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

FOLDERS = ("recipes", "eval", "prompts")


def shipped(*parts: str) -> Path:
    """A file or folder shipped with the package, e.g. shipped("eval", "micro-striped.yaml")."""
    # A regular package installed by pip or from a checkout is on the file system, so this is a Path.
    return Path(files(__name__)).joinpath(*parts)


def locate(path: str | Path, relative_to: Path | None = None) -> Path:
    """`path` (joined to `relative_to`, for an `include:`) if it exists; else, when `path` starts with
    recipes/, eval/ or prompts/, the shipped copy if there is one; else `path` as given, for the
    caller's error to name."""
    path = Path(path)
    given = relative_to / path if relative_to is not None else path
    if given.exists() or path.is_absolute() or not path.parts or path.parts[0] not in FOLDERS:
        return given
    copy = shipped(*path.parts)
    return copy if copy.exists() else given
