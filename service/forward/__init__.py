"""Forwarding to NATS JetStream (the edge) and serving from it (the hub)."""
