"""Dataset building, user simulation, validation and torch-side loading."""
