"""`python -m lightning_export` runs the lexport CLI."""

from .cli import main

if __name__ == "__main__":
    main()
