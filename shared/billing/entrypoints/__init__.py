"""What the Lambda handlers and the local runner both call: parse at the edge, call one service."""
