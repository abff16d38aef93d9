"""Weight initialisation shared by every model in :mod:`pilot.models`.

He et al. (2016) initialise their CIFAR and ImageNet ResNets "as in [He et al. 2015]",
i.e. Kaiming-normal. We follow torchvision's reading of that:

* ``Conv2d``: Kaiming-normal, ``mode="fan_out"``, ReLU gain: std = sqrt(2 / (C_out * kH * kW)).
* ``Linear``: Kaiming-normal, ``mode="fan_in"``, ReLU gain: std = sqrt(2 / in_features).
  ``fan_in`` because ``fan_out`` of a 10-way classifier head would give std ~0.45 and
  saturate the initial logits; for the MLP it preserves activation variance layer to layer.
* Biases 0; ``BatchNorm`` weight 1, bias 0.

``conv_mode="fan_in"`` gives the convolutions std = sqrt(2 / (C_in * kH * kW)) instead: STR's ImageNet setup
(Kusupati et al. 2020), which the paper's ResNet-50 experiment follows.
"""

from torch import nn


def init_weights(model: nn.Module, *, conv_mode: str = "fan_out") -> nn.Module:
    """Re-initialise every Conv2d, Linear and BatchNorm in ``model`` in place; returns ``model``.
    ``conv_mode`` ("fan_out" or "fan_in") is the Kaiming mode of the convolutions."""
    if conv_mode not in ("fan_out", "fan_in"):
        raise ValueError(f"conv_mode must be 'fan_out' or 'fan_in', got {conv_mode!r}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=conv_mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
