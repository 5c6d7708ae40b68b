"""``python -m moetool`` runs the command-line interface."""

from moetool.cli import main

if __name__ == "__main__":
    main()
