"""The stack: settings, processes, the embedded components, and what Prefect needs before a run."""

# Installed as ``fabloop.infra``. Imported under its folder name (a checkout on sys.path),
# it would load a second copy of every module beside the installed one.
if __name__ != "fabloop.infra":
    raise ImportError(f"import fabloop.infra, not {__name__!r} (the folder is installed under the fabloop namespace)")

