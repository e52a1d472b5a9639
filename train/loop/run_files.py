"""The files of a run directory (${run_dir}) and of a sweep's folder; no other module spells these names.

Torch-free, so that the sweep's table and checks can read them without loading the trainer."""

# A run directory.
CONFIG_FILE = "config.yaml"  # the resolved config of the run (and of each checkpoint)
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
PROFILE_FILE = "profile.md"  # profile_steps: the phase table and top operators (train/loop/profile.py)
PROFILE_TRACE_FILE = "profile_trace.json"  # profile_steps: torch.profiler's Chrome trace
FINAL_DIR = "FINAL"  # the trained model as a Hugging Face folder
FINAL_CONFIG_FILE = "halyard_config.yaml"
MODEL_CARD_FILE = "README.md"  # in FINAL/: the model card, in the Hugging Face Hub's format (train/loop/card.py)
PREFIX = "step-"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
HYDRA_FILES = (".hydra", "launch.log")  # what Hydra writes into a run directory (hydra.run.dir) before the run
JOB_FILE = "job.json"  # a job of a sweep: its overrides, status and wall time
LAUNCH_FILES = (*HYDRA_FILES, JOB_FILE)  # written into a run directory by this launch before the run starts

# A sweep's folder (hydra.sweep.dir).
TABLE_FILE = "sweep_summary.txt"
TABLE_JSON = "sweep_summary.json"
