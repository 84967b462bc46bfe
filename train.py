"""``python train.py fit|validate|test|predict --config CONFIG``: the same as ``saliency-lab fit ...`` (a thin wrapper kept so that
the documented commands work from the checkout; the code lives in ``saliency_lab.cli.train``)."""
from saliency_lab.cli.train import main

if __name__ == "__main__":
    main()
