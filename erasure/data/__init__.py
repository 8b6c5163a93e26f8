"""Reading forget/retain sets."""
