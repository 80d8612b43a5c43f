"""The pure core: names, positions (LSNs), times, records, errors, settings."""
