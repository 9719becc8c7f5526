# python compare_pairings.py retune_rows_N.json: the two pairings of turns, side by side
import json, sys, numpy as np
d = json.load(open(sys.argv[1]))
rows = d["rows"]
base = next(r for r in rows if r["backend"].startswith("torch"))
def disp(q):
    lo, hi = np.percentile(q, [25, 75]); return (hi - lo) / np.median(q)
for r in rows:
    for k in ("latency_b1", "latency"):
        l, b = r.get(k), base.get(k)
        if not l or not b or r is base or not l.get("turns_ms"): continue
        q0 = np.array(b["turns_ms"]) / np.array(l["turns_ms"])
        bi = np.interp(l["turns_at_s"], b["turns_at_s"], b["turns_ms"])
        q1 = bi / np.array(l["turns_ms"])
        print(f"{r['backend'][:11]:11s} {r['precision']:8s} {k:10s} same-turn {np.median(q0):.2f} IQR {disp(q0):4.0%} | interpolated {np.median(q1):.2f} IQR {disp(q1):4.0%}")
