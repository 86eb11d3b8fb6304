"""Service layer: the use cases, written against the ports."""
