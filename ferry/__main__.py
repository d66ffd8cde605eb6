"""``python -m ferry``: the same as the ``ferry`` command."""
from ferry.cli import main

if __name__ == "__main__":
    main()
