"""Data for fine-tuning, read offline: tables and text files, the built-in data sets, and batching."""
