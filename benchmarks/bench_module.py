"""The LightningModule the benchmark exports: a deep MLP whose size is set by (width, depth).

Kept to plain-typed hyperparameters, so the checkpoint opens with torch.load(weights_only=True).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class BigMLP(pl.LightningModule):
    def __init__(self, width: int = 1024, depth: int = 4, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, width))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.model = nn.Sequential(*layers)
        self.example_input_array = torch.randn(2, width, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
