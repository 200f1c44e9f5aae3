"""daggyr: a remote task executor."""
