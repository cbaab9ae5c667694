"""User-facing errors: one clear sentence about what was wrong and how to fix it."""


class UniLoraError(ValueError):
    """Raised for bad input (configs, files, models); the CLI prints it as one line."""


class LayoutMismatchError(UniLoraError):
    """The adapter was built for a different set of adapted layers than the model offers."""
