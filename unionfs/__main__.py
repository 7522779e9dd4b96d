"""`python -m unionfs`: the same entry point as the `unionfs` console script."""

from unionfs.client import main

if __name__ == "__main__":
    raise SystemExit(main())
