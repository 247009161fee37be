"""Print regularized-step / plain-step ratios from a pytest-benchmark JSON file (one run)."""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "method" not in info:
            continue
        key = (info["device_name"], info["arch"], info["m"])
        rows[key][info["method"]] = b["stats"]["median"]
    methods = ["plain", "cos", "gal", "gdr", "gal-stacked", "gal-autograd"]
    print("| device | model | M | plain step | " + " | ".join(f"{m} / plain" for m in methods[1:])
          + " |")
    print("|---" * (4 + len(methods) - 1) + "|")
    for (dev, arch, m), t in sorted(rows.items()):
        base = t["plain"]
        cells = [f"{t[k] / base:.2f}" if k in t else "-" for k in methods[1:]]
        print(f"| {dev} | {arch} | {m} | {base * 1000:.0f} ms | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
