"""Code generated from proto/daggyr/v1 by `make proto`."""
