"""Run pytest and refuse a run that collected no test.

pytest exits 5 when it collects nothing; for this project that means the suite is broken
(a bad path, a conftest that skipped everything), not that all is well, so it is a failure
with a message saying so.
"""

import sys

import pytest

NO_TESTS_COLLECTED = 5


def main() -> int:
    code = int(pytest.main(sys.argv[1:]))
    if code == NO_TESTS_COLLECTED:
        sys.stderr.write("pytest collected no tests: the suite is broken, failing the run\n")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
