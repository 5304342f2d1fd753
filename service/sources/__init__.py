"""Record sources that run in worker processes."""
