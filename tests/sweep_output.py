"""Reading a sweep's console output in tests."""

import re

# the header of the sweep's per-trial table; its columns are as wide as their widest entry ("method" is followed by
# 2 spaces without a baseline row, 4 with one)
TRIAL_TABLE = re.compile(r"^method +#GAN +order +keep +seed", re.MULTILINE)


def trial_table(stdout: str) -> str:
    """The last per-trial table in ``stdout``, up to the statistics block that follows it."""
    starts = [m.start() for m in TRIAL_TABLE.finditer(stdout)]
    assert starts, "no per-trial table in the sweep's output:\n" + stdout[-3000:]
    return stdout[starts[-1]:].split("over seeds")[0]
