"""Saliency explainers behind one contract; the registry is filled in by explainers/ owners."""
