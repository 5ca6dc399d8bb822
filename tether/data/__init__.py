"""Data: row formats, tokenisation, collation, built-in tasks."""
