"""Entry point of `python -m safegrpo_pl`."""

from safegrpo_pl.cli import main

if __name__ == "__main__":
    main()
