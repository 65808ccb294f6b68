"""Data preparation: LongLaMP (and synthetic data in the same schema) -> verl-format parquet.

- `data_prep.longlamp`: CLI and `prepare()` (retrieval, token budgets, parquet + stats.json).
- `data_prep.synthetic`: CLI and `write_synthetic()` (LongLaMP-schema records with a real
  per-user signal, for the default job and the tests).
"""
