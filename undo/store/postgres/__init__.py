"""The audit store on PostgreSQL (SPEC.md "Stores"): the schema ``undo_store`` of a database,
written by capture with COPY, one batch and its position per store transaction; many sources."""
