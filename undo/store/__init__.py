"""The audit store: a documented SQLite file (schema.py), its writer and its queries."""
