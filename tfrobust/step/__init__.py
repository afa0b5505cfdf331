"""The pieces of RobustModel's train step, each with one job (docs/architecture.md, "The step").

- :mod:`~tfrobust.step.settings`: the step's settings as one frozen, validated value;
- :mod:`~tfrobust.step.micro_batches`: the walk over a batch in micro-batches (one micro-batch: the batch itself);
- :mod:`~tfrobust.step.objective`: the objective, its weighting over the batch, weight decay;
- :mod:`~tfrobust.step.fused_batch_norm`: the network as the step calls it, with fused BatchNorm in mixed precision;
- :mod:`~tfrobust.step.hooks`: the weight-space terms' hook points;
- :mod:`~tfrobust.step.averaging`: the weight average;
- :mod:`~tfrobust.step.checks`: the checks of a network and of ``fit``'s data before anything is traced;
- :mod:`~tfrobust.step.metrics`: the metrics the model reports and their directions.

None of them calls back into the model: each gets the network, the
optimizer's step or the settings it needs as arguments.
"""

__all__: list = []  # the modules are imported by name
