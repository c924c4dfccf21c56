#!/usr/bin/env python3
"""The reports of the two-sided A/B scripts (pusher.sh, sockudo.sh, compression.sh,
reconnect-storm.sh), in one place.

  report.py run REPORT.json
      one line for one run of the generator: CPU per delivery, rate, latency, loss, errors;
  report.py medians OUT ROUNDS "TITLE" SIDE_A SIDE_B SCENARIO...
      the medians of OUT/SIDE-rN/SCENARIO.json over the rounds, per scenario and side, and
      SIDE_B/SIDE_A of the server CPU per delivery. Reports that have wire bytes (a generator
      with `wire_bytes_per_delivery`) get a bytes-per-delivery column and that ratio too; older
      reports print as they always did;
  report.py storm-run REPORT.json
      one line for one reconnect storm: time until half / 99% / all are back, server B's CPU
      per reconnect, attempts and failures, clients not back, errors;
  report.py storm-medians OUT ROUNDS "TITLE" SIDE_A SIDE_B
      the medians of OUT/SIDE-rN/reconnect-storm.json over the rounds, per side, and
      SIDE_B/SIDE_A of the time until all are back and of the CPU per reconnect. A run in which
      not every client came back has no "all" time: it counts as infinitely slow in the
      median, and its side's "not back" column says so.
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


# Errors of these stages are the storm's own failed attempts (each one retried); anything else
# (a failed setup, a drop, a close other than 1001) is listed apart as unexpected.
STORM_RETRIED = ("reconnect", "rejoin")


def storm_run(path):
    r = json.load(open(path))
    res = r["results"]
    ms = lambda v: "-" if v is None else f"{v / 1000:.3f} s"
    other = [e for e in r.get("errors", []) if e["stage"] not in STORM_RETRIED]
    retried = ", ".join(f"{e['stage']} {e['cause']} {e['count']}" for e in r.get("errors", [])
                        if e["stage"] in STORM_RETRIED)
    print(f"    back {res['back']:,} of {res['in_storm']:,} (of {res['clients']:,} clients): "
          f"half {ms(res['back_half_ms'])}, 99% {ms(res['back_p99_ms'])}, "
          f"all {ms(res['back_all_ms'])}; 1001 closes {res['closed_going_away']:,} "
          f"by {ms(res['last_close_ms'])}, other closes {res['closed_otherwise']}, "
          f"never closed {res['never_closed']}; B {res['server_cpu_us_per_reconnect']} "
          f"us/reconnect, RSS after {res['server_rss_after_kib']} KiB; "
          f"attempts {res['reconnect_attempts']:,}, failed {res['reconnect_failures']:,}"
          + (f" ({retried})" if retried else "")
          + f"; machine {r.get('machine_cpu_busy')}"
          + (f"; UNEXPECTED {other}" if other else ""),
          "; ".join(r["warnings"]))


def storm_medians(out, rounds, title, side_a, side_b):
    med = statistics.median
    inf = float("inf")
    print(f"medians of {rounds} rounds ({title})")
    print(f"{'side':8} {'all back s':>10} {'99% s':>8} {'half s':>8} {'us CPU/reconn':>13} "
          f"{'B RSS MiB':>9} {'failed':>8} {'not back':>8} {'unexpected':>10}  machine busy")
    all_of, cpu_of = {}, {}
    for side in (side_a, side_b):
        runs = [json.load(open(f"{out}/{side}-r{n}/reconnect-storm.json"))
                for n in range(1, rounds + 1)]
        res = [r["results"] for r in runs]
        secs = lambda key: med(inf if x[key] is None else x[key] / 1000 for x in res)
        all_of[side] = secs("back_all_ms")
        cpu_of[side] = med(x["server_cpu_us_per_reconnect"] or 0 for x in res)
        unexpected = sum(e["count"] for r in runs for e in r.get("errors", [])
                         if e["stage"] not in STORM_RETRIED)
        print(f"{side:8} {all_of[side]:10.3f} {secs('back_p99_ms'):8.3f} "
              f"{secs('back_half_ms'):8.3f} {cpu_of[side]:13.2f} "
              f"{med((x['server_rss_after_kib'] or 0) / 1024 for x in res):9.1f} "
              f"{med(x['reconnect_failures'] for x in res):8,.0f} "
              f"{max(x['not_back'] for x in res):8,} {unexpected:10,}  "
              f"{[r.get('machine_cpu_busy') for r in runs]}")
    if 0 < all_of[side_a] < inf and all_of[side_b] < inf:
        print(f"{side_b}/{side_a} time until all are back: {all_of[side_b] / all_of[side_a]:.2f}x")
    if cpu_of[side_a]:
        print(f"{side_b}/{side_a} server CPU per reconnect: {cpu_of[side_b] / cpu_of[side_a]:.2f}x")
    print("(not back: the most of any round; unexpected: errors of all rounds outside "
          "reconnect/rejoin attempts)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    elif sys.argv[1:2] == ["medians"] and len(sys.argv) >= 8:
        medians(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6],
                sys.argv[7:])
    elif sys.argv[1:2] == ["storm-run"] and len(sys.argv) == 3:
        storm_run(sys.argv[2])
    elif sys.argv[1:2] == ["storm-medians"] and len(sys.argv) == 7:
        storm_medians(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        sys.exit(__doc__)
