"""Dataset QA of a store: the qa.parquet table and the HTML report (reads the store only)."""
