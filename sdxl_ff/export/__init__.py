"""The single-file export for ComfyUI / A1111 and the trainer step that runs it."""
