"""Model and tokenizer sources: a local directory that exists and holds what it should, or a hub id.

transformers answers a mistyped local path with "Repo id must be in the form 'repo_name' or
'namespace/repo_name'" (it took the path for a hub id) and a missing hub repo with a long HTTP traceback. These
checks run before any loading and say which flag, what the value is, and what to pass instead; `load_pretrained`
turns a loading failure into one line naming the flag and keeps the cause chained.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

# The hub's rule: letters, digits, '-', '_', '.'; an optional namespace; no leading or trailing '-' or '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")
REQUIRED_FILES = {"model": ("config.json",), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and ".." not in value


def check_pretrained_source(flag: str, value: str, kind: str) -> None:
    """Refuse a source that can be neither loaded from disk nor looked up on the hub; `kind`: model or tokenizer."""
    path = Path(value).expanduser()
    if path.is_dir():
        needed = REQUIRED_FILES[kind]
        if not any((path / name).is_file() for name in needed):
            raise ValueError(f"{flag} ({value}) is a directory without {' or '.join(needed)}, so not a {kind} "
                             f"directory; pass the folder save_pretrained wrote (for a {kind}), or a hub id.")
        return
    if path.exists():
        raise ValueError(f"{flag} ({value}) is a file; pass the directory that holds the {kind} files, or a hub id.")
    if value.startswith((".", "/", "~")) or not is_hub_id(value):
        raise ValueError(f"{flag} ({value}) does not exist, and is not a hub id (namespace/name, e.g. "
                         "inclusionAI/LLaDA2.0-mini); check the path.")


def load_pretrained(flag: str, value: str, loader: Callable, **kwargs):
    """`loader(value, **kwargs)` (a from_pretrained), a failure to find or read it named by flag and value."""
    try:
        return loader(value, **kwargs)
    except OSError as error:  # the hub's not-found / offline errors and transformers' missing-file errors
        first = (str(error) or type(error).__name__).strip().splitlines()[0]
        raise ValueError(f"{flag} ({value}) could not be loaded: {first}. Check the path or hub id (and network "
                         "access / HF_TOKEN for a private hub repo).") from error
