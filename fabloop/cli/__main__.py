"""``python -m fabloop.cli``: the same command line as the ``fabloop`` script."""

from fabloop.cli import main

if __name__ == "__main__":
    main()
