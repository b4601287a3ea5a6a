"""Suite-wide options. Kernel schedule counts can be raised for long runs:

    pytest tests/kernel/test_random_schedules.py --sim-seeds 20000 --sim-steps 1000
"""


def pytest_addoption(parser):
    group = parser.getgroup("bwraft")
    group.addoption("--sim-seeds", type=int, default=1000,
                    help="randomized kernel schedules to run (default 1000)")
    group.addoption("--sim-steps", type=int, default=400,
                    help="steps per randomized kernel schedule (default 400)")
    group.addoption("--sim-first-seed", type=int, default=0,
                    help="first seed of the randomized kernel schedules")


def pytest_terminal_summary(terminalreporter, config):
    """Say how much the randomized kernel schedules covered (set by that test)."""
    summary = getattr(config, "bwraft_schedule_summary", None)
    if summary:
        terminalreporter.write_sep("-", "randomized kernel schedules")
        terminalreporter.write_line(summary)
