"""The user's LightningModule: importing it, its constructor arguments (checkpoint, configs, flags), building and
strict loading, and --attr."""
