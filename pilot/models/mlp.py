"""LeNet-300-100 (LeCun et al. 1998): the fully connected network used in pruning papers."""

import torch
from torch import nn

from pilot.models.init import init_weights


class LeNet300100(nn.Module):
    """MLP ``in_channels * input_size**2 -> 300 -> 100 -> num_classes`` with ReLU; flattens its input.

    For 28x28 grayscale inputs and 10 classes it has 266,610 parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        for arg_name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)):
            if value < 1:
                raise ValueError(f"{arg_name} must be >= 1, got {value}")
        self.in_features = in_channels * input_size * input_size
        self.fc1 = nn.Linear(self.in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"LeNet-300-100 was built for {self.in_features} input features per example "
                f"(in_channels * input_size**2), got {x.shape[1]}"
            )
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))
