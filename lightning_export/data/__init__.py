"""`--data`: real batches for calibration and verification.

Building blocks, each usable on its own; the pipeline wires them together (pipeline.data.read_data):

- `files.load_batches_file(path)`: a `.pt` file holding a list of batches, loaded under the `--example-inputs` /
  checkpoint rules (regular file, zip directory checked, weights_only, tensors bounded by the file's size, CRC-32).
- `build.datamodule.read_data_section(config)` + `build_datamodule(section)` + `take_batches(dm)` :
  the user's LightningDataModule (in build: it is built with the engines that build the model) from the `data:` section of a LightningCLI or Hydra config, its batches from
  val_dataloader() else test_dataloader() else train_dataloader().
- `batches.to_inputs(batch, forward)`: the documented rule from a batch to forward's arguments, with the labels
  Lightning's convention puts beside them; `batches.prepare(...)`: every batch mapped, and the split into
  calibration and held-out verification batches.

Agreement between an artifact and the eager module on those batches is in `lightning_export.agreement`.
"""
