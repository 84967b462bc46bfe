"""``python demo.py ...``: the same as ``saliency-lab demo ...`` (a thin wrapper kept so that the documented commands work
from the checkout; the code lives in ``saliency_lab.cli.demo``)."""
import sys

from saliency_lab.cli.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
