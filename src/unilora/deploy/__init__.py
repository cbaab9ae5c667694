"""Serving engines beyond one process: vLLM (a LoRA resolver plugin) and Ray Serve."""
