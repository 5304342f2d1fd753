"""Terminal tools for a running service: `ringstream tail` and `ringstream top`."""
