"""The plain ``nn.Module``s of the learned mask predictor, apart from Lightning code.

- :mod:`networks.feature_filter` — :class:`FeatureFilter`, the class selector (stage 1);
- :mod:`networks.controllers` — the distribution controllers (CT, BT, x^2, MGnet's ratio head);
- :mod:`networks.mask_generator` — :class:`MaskGenerator` and :class:`MaskPredictorNet` (stage 2).

They stand on ``core`` only, so both the trainers (``lightning_modules``) and the explainer that loads a
trained predictor (``explainers.mask_predictor``) import them: neither needs the other.
"""
