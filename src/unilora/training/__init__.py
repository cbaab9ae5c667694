"""Training: the shared loop, the tasks (classification, causal LM, distillation), recipes and plans."""
