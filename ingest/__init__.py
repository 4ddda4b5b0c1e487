"""Ingest: convert medical data into shard sets on Ray."""
