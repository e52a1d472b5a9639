"""The benchmarks behind scripts/benchmark.py (its command line), one module per subcommand, and what they share:
synthetic data (data.py), running Halyard and its peers in their own processes (runs.py, child.py), the model the
comparisons train (models.py). Results go to docs/BENCHMARKS.md with the command that produced them."""
