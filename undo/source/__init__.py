"""What runs in and against the source database: init, guards, status, catalog."""
