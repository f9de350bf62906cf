"""Shared helpers of the ingest stages (crawl, read_warc, read_files): charset detection and
decoding, URL normalisation and allow-lists."""
