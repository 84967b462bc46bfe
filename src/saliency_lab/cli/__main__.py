"""``python -m saliency_lab.cli SUBCOMMAND ...``: the same as the ``saliency-lab`` console script."""
from saliency_lab.cli.main import main

main()
