"""A procedural micro world of captioned 32×32 shape images and an oracle classifier that reads it back."""
