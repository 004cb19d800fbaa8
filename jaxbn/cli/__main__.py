"""``python -m jaxbn.cli``: the ``jaxbn`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
