#!/usr/bin/env python3
"""The reports of the two-sided A/B scripts (pusher.sh, sockudo.sh, compression.sh), in one place.

  report.py run REPORT.json
      one line for one run of the generator: CPU per delivery, rate, latency, loss, errors;
  report.py medians OUT ROUNDS "TITLE" SIDE_A SIDE_B SCENARIO...
      the medians of OUT/SIDE-rN/SCENARIO.json over the rounds, per scenario and side, and
      SIDE_B/SIDE_A of the server CPU per delivery. Reports that have wire bytes (a generator
      with `wire_bytes_per_delivery`) get a bytes-per-delivery column and that ratio too; older
      reports print as they always did.
"""
import json
import statistics
import sys


def run(path):
    r = json.load(open(path))
    res = r["results"]
    lat = res["latency"]
    errors = ", ".join(f"{e['stage']} {e['cause']} {e['count']}" for e in r.get("errors", []))
    print(f"    {res.get('protocol', '')}: {res['server_cpu_us_per_delivery']} us/delivery, "
          f"{res['deliveries_per_second']:,.0f} deliveries/s, p50 {lat['p50_us'] / 1000:.2f} ms, "
          f"p99 {lat['p99_us'] / 1000:.2f} ms, lost {res['lost']} of {res['expected']}, "
          f"machine {r.get('machine_cpu_busy')}"
          + (f", {res['wire_bytes_per_delivery']} wire B/delivery"
             if res.get("wire_bytes_per_delivery") is not None else ""),
          errors, "; ".join(r["warnings"]))


def medians(out, rounds, title, side_a, side_b, scenarios):
    med = statistics.median
    runs_of = {(scenario, side): [json.load(open(f"{out}/{side}-r{n}/{scenario}.json"))
                                  for n in range(1, rounds + 1)]
               for scenario in scenarios for side in (side_a, side_b)}
    wire = all(r["results"].get("wire_bytes_per_delivery") is not None
               for runs in runs_of.values() for r in runs)
    print(f"medians of {rounds} rounds ({title})")
    print(f"{'scenario':20} {'side':8} {'us CPU/deliv':>12} "
          + (f"{'wire B/deliv':>12} " if wire else "")
          + f"{'deliveries/s':>13} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'lost':>10} {'loss %':>8}  machine busy")
    for scenario in scenarios:
        cpu_of, wire_of = {}, {}
        for side in (side_a, side_b):
            runs = runs_of[(scenario, side)]
            res = [r["results"] for r in runs]
            cpu = med(x["server_cpu_us_per_delivery"] or 0 for x in res)
            cpu_of[side] = cpu
            if wire:
                wire_of[side] = med(x["wire_bytes_per_delivery"] for x in res)
            busy = [r.get("machine_cpu_busy") for r in runs]
            print(f"{scenario:20} {side:8} {cpu:12.3f} "
                  + (f"{wire_of[side]:12.1f} " if wire else "")
                  + f"{med(x['deliveries_per_second'] for x in res):13,.0f} "
                  f"{med(x['latency']['p50_us'] for x in res) / 1000:8.2f} "
                  f"{med(x['latency']['p99_us'] for x in res) / 1000:8.2f} "
                  f"{med(x['lost'] for x in res):10,.0f} "
                  f"{med(x['loss_ratio'] for x in res) * 100:8.4f}  {busy}")
        if cpu_of[side_a]:
            print(f"{'':20} {side_b}/{side_a} server CPU per delivery: "
                  f"{cpu_of[side_b] / cpu_of[side_a]:.2f}x")
        if wire and wire_of[side_a]:
            print(f"{'':20} {side_b}/{side_a} wire bytes per delivery: "
                  f"{wire_of[side_b] / wire_of[side_a]:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    elif sys.argv[1:2] == ["medians"] and len(sys.argv) >= 8:
        medians(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6],
                sys.argv[7:])
    else:
        sys.exit(__doc__)
