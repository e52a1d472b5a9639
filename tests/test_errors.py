"""User-facing errors (train/errors.py): every configuration problem listed in one message."""

from train.errors import ConfigError, DataError, HalyardError


def test_a_config_error_lists_every_problem():
    error = ConfigError(["lr=-1.0: must be > 0", "unknown key 'loss.bta' (did you mean 'loss.beta'?)"])
    assert error.problems == ["lr=-1.0: must be > 0", "unknown key 'loss.bta' (did you mean 'loss.beta'?)"]
    assert str(error) == (
        "invalid configuration (2 problems):\n  - lr=-1.0: must be > 0\n"
        "  - unknown key 'loss.bta' (did you mean 'loss.beta'?)"
    )
    assert str(ConfigError(["lr=-1.0: must be > 0"])) == "invalid configuration (1 problem):\n  - lr=-1.0: must be > 0"


def test_user_errors_share_one_base_the_cli_reports_without_a_traceback():
    assert issubclass(ConfigError, HalyardError) and issubclass(DataError, HalyardError)
