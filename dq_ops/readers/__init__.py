"""Dataset readers: turn a source (IDX files, an image folder, npz/Zarr, JSON/JSONL) into batches
of samples with stable ids. Readers only read; ``dq_ops.ingest`` writes them into a store."""
