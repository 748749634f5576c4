"""Reading a run directory, never training: predictive uncertainty, calibration of the gate posterior, plots, the Markdown report."""
