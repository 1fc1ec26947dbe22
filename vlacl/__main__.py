"""Entry point for ``python -m vlacl``."""

from vlacl.cli import main

if __name__ == "__main__":
    main()
