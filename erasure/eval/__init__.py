"""Evaluation: suites as data (eval/*.yaml), generation, NudeNet, CLIP alignment, class forgetting, FID."""
