"""Published robust networks in and out: RobustBench's, DeepMind's and the papers' checkpoints as
tfrobust networks, and tfrobust networks as state dicts in the published names.

* :mod:`tfrobust.zoo.names`: ``--arch`` names, default normalisation, every parameter's published
  name and shape (no TensorFlow);
* :mod:`tfrobust.zoo.pickles`: PyTorch and pickled numpy files read without running their code
  and without PyTorch, and ``torch.save``'s format written;
* :mod:`tfrobust.zoo.checkpoints`: a checkpoint file as a flat state dict;
* :mod:`tfrobust.zoo.convert`: building the Keras network, loading, saving with provenance, export;
* :mod:`tfrobust.zoo.dm_preact`, :mod:`tfrobust.zoo.resnet`: DeepMind's PreActResNet-18 and
  torchvision's ImageNet ResNets in Keras (the others are :mod:`tfrobust.models`' builders).

``import_model(checkpoint, arch, data, output=None, mean=None, std=None)`` and
``export_model(source, output, fmt="pytorch")`` are the two entry points (also
``tfrobust import-model`` and ``tfrobust export-model``). Importing this package loads no TensorFlow.
"""


from tfrobust.zoo.convert import export_model, import_model

__all__ = ["import_model", "export_model"]
