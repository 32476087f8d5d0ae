"""``python -m hfquant ...``: the same command line as the ``hfquant`` script."""

from hfquant.cli import main

if __name__ == "__main__":
    main()
