"""Hardened torch.load: zip and CRC integrity, weights_only loading with placeholders, the --allow-global policy,
and the messages a refused file gets. Imports nothing above the leaves."""
