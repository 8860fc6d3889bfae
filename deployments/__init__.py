"""Deployment definitions: where and how the flows run (per work-pool type)."""

# Installed as ``fabloop.deployments``. Imported under its folder name (a checkout on sys.path),
# it would load a second copy of every module beside the installed one.
if __name__ != "fabloop.deployments":
    raise ImportError(f"import fabloop.deployments, not {__name__!r} (the folder is installed under the fabloop namespace)")

