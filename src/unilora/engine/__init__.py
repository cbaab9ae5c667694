"""The adapted model: layers that read their factors from a projection, named adapters, routing of
mixed batches, and what transformers, TRL, DDP and FSDP2 expect of a model."""
