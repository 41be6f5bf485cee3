"""Print runs/demo/summary.json (written by eval.py --summary) as a table."""

import json
import sys

# (summary key, label, the field that says where the model is)
ROWS = (("float", "float", "logdir"), ("qat_w8a8", "fake-quant W8A8 (TF)", "logdir"),
        ("int_w8a8", "integer W8A8 (NumPy)", "export"))


def main(path: str) -> None:
    with open(path) as f:
        summary = json.load(f)
    print("\n| model | BLEU | where |\n|---|---|---|")
    for key, label, where in ROWS:
        if key in summary:
            print(f"| {label} | {summary[key]['bleu']:.2f} | {summary[key][where]} |")
    if "int_w8a8" in summary and "token_agreement" in summary["int_w8a8"]:
        print(f"integer vs fake-quant: identical output on {summary['int_w8a8']['token_agreement']}% "
              f"of test sentences")
    signature = next(iter(summary.values()))["signature"]
    print(f"sacreBLEU {signature}; summary in {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/summary.json")
