"""l2c.pipeline: the caption-embedding job (sources → tokenize → encode in Ray actors → Parquet cache)."""
