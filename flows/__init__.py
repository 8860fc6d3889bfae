"""Prefect flows: wiring of tasks only (ingest, drift check, retrain, promote)."""

# Installed as ``fabloop.flows``. Imported under its folder name (a checkout on sys.path),
# it would load a second copy of every module beside the installed one.
if __name__ != "fabloop.flows":
    raise ImportError(f"import fabloop.flows, not {__name__!r} (the folder is installed under the fabloop namespace)")

