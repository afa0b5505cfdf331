"""The pieces of RobustModel's train step, each with one job (docs/architecture.md, "The step").

- :mod:`~tfrobust.step.micro_batches`: the walk over a batch in micro-batches (one micro-batch: the batch itself);
- :mod:`~tfrobust.step.checks`: the checks of a network and of ``fit``'s data before anything is traced;
- :mod:`~tfrobust.step.averaging`: the weight average;
- :mod:`~tfrobust.step.metrics`: the metrics the model reports and their directions.
"""
