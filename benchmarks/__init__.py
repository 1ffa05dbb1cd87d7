"""Benchmarks for lexport (`make bench`); `benchmarks.bench_module` is the LightningModule they export."""
