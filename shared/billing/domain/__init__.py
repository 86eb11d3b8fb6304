"""The billing domain: pure Python, no I/O."""
