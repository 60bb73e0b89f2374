"""The machine a run is on: crash-safe files, random streams, host-device copies, the console, WSL, GPU settings, pause
points. Imports no other room."""
