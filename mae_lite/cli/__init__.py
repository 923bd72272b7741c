"""Console commands: thin argument parsing over library functions."""
