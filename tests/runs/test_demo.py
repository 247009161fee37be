"""ensdiv demo: the report shows every measurement, the headline one included."""

import re

from ensdiv.runs.demo import TRANSFER_EPS, demo_report


def test_the_demo_reports_transfer_between_members_with_its_setup(one_thread):
    lines = demo_report(epochs=1, seed=0)
    transfer = [line for line in lines if "member → member transfer" in line]
    assert len(transfer) == 2  # plain and GAL
    for line in transfer:
        assert f"L∞ {TRANSFER_EPS}" in line and "first 200 test images" in line
        value = float(re.search(r": (\d\.\d{3})$", line).group(1))
        assert 0 <= value <= 1
