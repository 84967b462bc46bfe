"""The command line: ``saliency-lab SUBCOMMAND ...`` (or ``python -m saliency_lab.cli SUBCOMMAND ...``).

The top layer: it imports every layer below and nothing imports it. One module per subcommand, each with a
``main(argv)``; :mod:`saliency_lab.cli.main` dispatches.
"""
