"""Ingestion: validated readings into the database (ingestor) and files of readings (importfile)."""
