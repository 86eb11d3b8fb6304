"""Hourly usage billing for cloud marketplace customers (the code both Lambda functions run)."""
