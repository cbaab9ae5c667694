"""The vocabulary every other layer speaks: errors, the adapter config, the flattened parameter
layout, seeded random streams, which layers to adapt, and the task kinds. Imports nothing of ours."""
