"""Sample images and validation: sigma tables, the two backends, prompts, the grid, sample.py, the validation loss."""
