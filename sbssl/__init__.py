"""sbssl: audit vision models for social biases with image embedding association tests (iEAT)."""

__version__ = "0.1.0"
