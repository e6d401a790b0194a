"""Assertions shared by several test modules (importable: setup.cfg puts tests/ on pytest's pythonpath)."""


def assert_one_line_error(result, *needles: str) -> None:
    """A click result failed with exactly one ``Error: ...`` line containing every needle, no traceback.

    CliRunner keeps an unhandled exception in ``result.exception`` instead of printing its traceback;
    a command that failed cleanly ended with ``SystemExit``.
    """
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
