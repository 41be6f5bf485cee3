"""Print runs/demo/summary.json (written by eval.py --summary) as a table."""

import json
import sys

# (summary key, label, the field that says where the model is)
ROWS = (("float", "float", "logdir"), ("qat_w8a8", "fake-quant W8A8 (TF)", "logdir"),
        ("int_w8a8", "integer W8A8 (NumPy)", "export"),
        ("qat_intonly_w8a8", "integer-only W8A8 (TF)", "logdir"),
        ("intonly_w8a8", "integer-only W8A8 (NumPy, integers from ids to argmax)", "export"))
# engine rows and the TF rows their token agreement is measured against
AGREEMENT = (("int_w8a8", "integer W8A8 vs fake-quant"), ("intonly_w8a8", "integer-only engine vs TF"))


def main(path: str) -> None:
    with open(path) as f:
        summary = json.load(f)
    print("\n| model | BLEU | where |\n|---|---|---|")
    for key, label, where in ROWS:
        if key in summary:
            print(f"| {label} | {summary[key]['bleu']:.2f} | {summary[key][where]} |")
    for key, label in AGREEMENT:
        if "token_agreement" in summary.get(key, {}):
            print(f"{label}: identical output on {summary[key]['token_agreement']}% of test sentences")
    signature = next(iter(summary.values()))["signature"]
    print(f"sacreBLEU {signature}; summary in {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/summary.json")
