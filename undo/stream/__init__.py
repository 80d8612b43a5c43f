"""The change stream: replication framing, the two decoders, and the capture loop."""
