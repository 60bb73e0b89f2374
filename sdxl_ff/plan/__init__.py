"""The memory planner: the predicted peak of a step from model configs alone, and its report."""
