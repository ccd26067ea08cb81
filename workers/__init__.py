"""Stage-side code: sharded model loading, forward with capture, contributions, wire format."""
