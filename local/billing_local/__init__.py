"""Local tooling: the command line, the local stack, emulators and the runner (not in the Lambda layer)."""
