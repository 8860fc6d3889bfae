"""Prefect tasks: each a thin, retryable call into ``fabloop.core`` or ``fabloop.adapters``."""

# Installed as ``fabloop.tasks``. Imported under its folder name (a checkout on sys.path),
# it would load a second copy of every module beside the installed one.
if __name__ != "fabloop.tasks":
    raise ImportError(f"import fabloop.tasks, not {__name__!r} (the folder is installed under the fabloop namespace)")

