"""The application: the config schema and its validation, help, one run from config to FINAL/, sweeps, launchers."""
