"""The SDXL parts: loading them, the tiny SDXL, attention, which modules train, conditioning, weight checks."""
