"""pytest configuration of the benchmark tests: marks the tests that pytest-benchmark times."""


def pytest_collection_modifyitems(items):
    # pytest-benchmark times nothing under pytest-xdist: CI runs the tests marked here in one process and the
    # others in xdist workers beside it (`-m timed` / `-m "not timed"`).
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker("timed")
