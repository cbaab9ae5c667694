"""Base models loaded offline: encoders and causal LMs, the embedded MiniLM and SmolLM2."""
