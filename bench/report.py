#!/usr/bin/env python3
"""bench/report.py: turns the raw output of bench/run.sh into a report.

    report.py RESULTS_DIR
        reads RESULTS_DIR/raw/ (wrk outputs, trimmed oha JSON, machine.txt) and
        writes RESULTS_DIR/results.md and RESULTS_DIR/chart.png (when
        matplotlib is there).
    report.py --trim-oha FULL.json OUT.json TARGET
        keeps the summary and the percentiles of one oha --json output.
    report.py --percentiles OHA.json
        prints "P50 P99" (ms) of one oha --json output, or nothing when it
        measured nothing or saw errors (bench/latency.sh).

Standard library only, apart from matplotlib for the chart.
"""

import json
import re
import statistics
import sys
from pathlib import Path

TARGETS = ["balancer", "floor", "nginx", "haproxy", "direct"]
PATHS = ["/", "/cache-me", "/info"]
LABEL = {
    "balancer": "balancer (Pingora)",
    "floor": "floor (Pingora, bench/floor)",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "direct": "backend directly",
}
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


# ------------------------------------------------------------------ parsing

def parse_wrk(path):
    """One wrk --latency output with run.sh's '# key: value' lines around it."""
    text = path.read_text(errors="replace")
    meta = dict(re.findall(r"^# (\w+): (.*)$", text, re.M))
    run = {
        "target": meta.get("target"),
        "path": meta.get("path"),
        "rss_before_kb": int(meta.get("rss_before_kb", 0)) or None,
        "peak_rss_kb": int(meta.get("peak_rss_kb", 0)) or None,
        "rps": None,
        "p50": None,
        "p99": None,
        "errors": None,
        "cpu_user_us": None,
        "cpu_system_us": None,
    }
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not rps:  # wrk failed or was cut short: the run counts as missing
        return run
    run["rps"] = float(rps.group(1))
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        run["p" + pct] = float(value) * UNIT_MS[unit]
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    run["errors"] = errors
    requests = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if requests and int(requests.group(1)) and "cpu_user_seconds" in meta:
        n = int(requests.group(1))
        run["cpu_user_us"] = float(meta["cpu_user_seconds"]) * 1e6 / n
        run["cpu_system_us"] = float(meta["cpu_system_seconds"]) * 1e6 / n
    return run


def trim_oha(full, out, target):
    """Keeps what the report needs of oha's JSON (the histogram is large)."""
    try:
        data = json.loads(Path(full).read_text())
    except (OSError, ValueError) as e:
        data = {"error": f"no oha output: {e}"}
    kept = {"target": target}
    for key in ("summary", "latencyPercentiles", "statusCodeDistribution", "errorDistribution", "error"):
        if key in data:
            kept[key] = data[key]
    Path(out).write_text(json.dumps(kept, indent=1) + "\n")


def parse_oha(path):
    data = json.loads(path.read_text())
    run = {"target": data.get("target"), "rps": None, "p50": None, "p99": None, "errors": None}
    summary, pct = data.get("summary"), data.get("latencyPercentiles")
    if not summary or not pct:
        return run
    run["rps"] = summary.get("requestsPerSec")
    # oha gives seconds; a percentile is null when nothing was measured.
    run["p50"] = pct["p50"] * 1000 if pct.get("p50") is not None else None
    run["p99"] = pct["p99"] * 1000 if pct.get("p99") is not None else None
    codes = data.get("statusCodeDistribution") or {}
    run["errors"] = sum(n for code, n in codes.items() if not str(code).startswith("2")) + sum(
        (data.get("errorDistribution") or {}).values()
    )
    return run


def load(raw):
    runs = {"wrk": [], "held": [], "rate": []}
    for f in sorted(raw.glob("wrk-r*.txt")):
        runs["wrk"].append(parse_wrk(f))
    for f in sorted(raw.glob("c*-r*.txt")):
        runs["held"].append(parse_wrk(f))
    for f in sorted(raw.glob("rate-r*.json")):
        runs["rate"].append(parse_oha(f))
    machine = {}
    mfile = raw / "machine.txt"
    if mfile.exists():
        for line in mfile.read_text().splitlines():
            key, _, value = line.partition(": ")
            machine[key] = value.strip()
    return runs, machine


# ------------------------------------------------------------------ figures

def figures(runs, target, path=None):
    """Medians (and spread) over the rounds of one target (and path)."""
    chosen = [r for r in runs if r["target"] == target and (path is None or r["path"] == path)]
    out = {"rounds": len(chosen), "measured": sum(r["rps"] is not None for r in chosen)}
    for key in ("rps", "p50", "p99", "errors", "peak_rss_kb", "rss_before_kb", "cpu_user_us", "cpu_system_us"):
        values = [r[key] for r in chosen if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
        out[key + "_min"] = min(values) if values else None
        out[key + "_max"] = max(values) if values else None
    return out


def fmt_rps(v):
    return "–" if v is None else f"{v:,.0f}"


def fmt_ms(v):
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def fmt_mb(kb):
    return "–" if kb is None else f"{kb / 1024:.1f}"


def fmt_ratio(v, ref):
    if v is None or not ref:
        return "–"
    return f"{v / ref:.2f}"


def fmt_spread(f):
    lo, hi, med = f["rps_min"], f["rps_max"], f["rps"]
    if med is None or f["measured"] < 2:
        return "–"
    return f"±{(hi - lo) / 2 / med * 100:.0f}%"


def fmt_errors(f):
    if f["errors"] is None:
        return "–"
    return f"{f['errors']:.0f}" if f["errors_max"] == f["errors"] else f"{f['errors']:.0f} (max {f['errors_max']:.0f})"


def measured_note(f):
    return "" if f["measured"] == f["rounds"] else f" ({f['measured']}/{f['rounds']} runs)"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ report

def throughput_section(runs):
    out = ["## Throughput: `wrk -t1 -c64`, one path at a time", ""]
    out.append(
        "Medians over the rounds; *spread* is half the range of requests/s over the rounds, as a share of "
        "the median; *× nginx* divides by nginx's median on the same path in this run, *× floor* by the "
        "floor's (the smallest Pingora proxy doing the same forwarding: what is above it is the balancer's "
        "own cost; for requests/s higher "
        "is better, for latency and memory lower is better). *errors* counts non-2xx/3xx answers and socket "
        "errors per run. *peak RSS* is the largest VmRSS sampled every 100 ms during the run (nginx: master + "
        "worker; for *backend directly*: the backend's own)."
    )
    for path in PATHS:
        ref = figures(runs, "nginx", path)
        floor = figures(runs, "floor", path)
        rows = []
        for target in TARGETS:
            f = figures(runs, target, path)
            if not f["rounds"]:
                continue
            rows.append([
                LABEL[target] + measured_note(f),
                fmt_rps(f["rps"]), fmt_spread(f), fmt_ratio(f["rps"], floor["rps"]),
                fmt_ratio(f["rps"], ref["rps"]),
                fmt_ms(f["p50"]), fmt_ratio(f["p50"], ref["p50"]),
                fmt_ms(f["p99"]), fmt_ratio(f["p99"], ref["p99"]),
                fmt_errors(f),
                fmt_mb(f["peak_rss_kb"]), fmt_ratio(f["peak_rss_kb"], floor["peak_rss_kb"]),
                fmt_ratio(f["peak_rss_kb"], ref["peak_rss_kb"]),
            ])
        what = {
            "/": "proxied (`Hello World!`)",
            "/cache-me": "cache hit for the balancer and nginx; HAProxy and the floor have no cache and are "
            "left out; "
            "*backend directly* is the origin generating it",
            "/info": "proxied (a small JSON built from the forwarded headers)",
        }[path]
        out += ["", f"### `{path}`: {what}", ""]
        out.append(table(
            ["target", "req/s", "spread", "× floor", "× nginx", "p50 ms", "× nginx", "p99 ms", "× nginx",
             "errors", "peak RSS MB", "× floor", "× nginx"],
            rows,
        ))
    return out


def fmt_us(v):
    return "–" if v is None else f"{v:.1f}"


def cpu_section(runs):
    out = [
        "## CPU per request: the same runs",
        "",
        "The user and system CPU time the proxy's processes (nginx: master + worker; *backend directly*: the "
        "backend) used over each measured run (from `/proc/PID/stat`), divided by the requests wrk counted; "
        "medians over the rounds, in microseconds. *CPU* is their sum as a share of one core over the run.",
    ]
    for path in PATHS:
        ref = figures(runs, "nginx", path)
        ref_total = None if ref["cpu_user_us"] is None else ref["cpu_user_us"] + ref["cpu_system_us"]
        floor = figures(runs, "floor", path)
        floor_total = None if floor["cpu_user_us"] is None else floor["cpu_user_us"] + floor["cpu_system_us"]
        rows = []
        for target in TARGETS:
            f = figures(runs, target, path)
            if not f["rounds"] or f["cpu_user_us"] is None:
                continue
            total = f["cpu_user_us"] + f["cpu_system_us"]
            rows.append([
                LABEL[target], fmt_us(f["cpu_user_us"]), fmt_ratio(f["cpu_user_us"], floor["cpu_user_us"]),
                fmt_us(f["cpu_system_us"]), fmt_ratio(f["cpu_system_us"], floor["cpu_system_us"]),
                fmt_us(total), fmt_ratio(total, floor_total),
                fmt_ratio(total, ref_total), "–" if f["rps"] is None else f"{total * f['rps'] / 1e4:.0f} %",
            ])
        if rows:
            out += ["", f"### `{path}`", ""]
            out.append(table(["target", "user µs", "× floor", "system µs", "× floor", "total µs", "× floor",
                              "× nginx", "CPU"], rows))
    return out


def held_section(runs, conns):
    ref = figures(runs, "nginx")
    floor = figures(runs, "floor")
    rows = []
    for target in TARGETS:
        f = figures(runs, target)
        if not f["rounds"]:
            continue
        rows.append([
            LABEL[target] + measured_note(f),
            fmt_mb(f["rss_before_kb"]),
            fmt_mb(f["peak_rss_kb"]), fmt_ratio(f["peak_rss_kb"], floor["peak_rss_kb"]),
            fmt_ratio(f["peak_rss_kb"], ref["peak_rss_kb"]),
            fmt_rps(f["rps"]), fmt_ms(f["p99"]), fmt_errors(f),
        ])
    return [
        f"## Memory with {conns} connections: `wrk -t1 -c{conns}` on `/`",
        "",
        "*RSS before* is VmRSS just before the run (after everything above); *peak RSS* the largest sampled "
        "during it. Medians over the rounds.",
        "",
        table(["target", "RSS before MB", "peak RSS MB", "× floor", "× nginx", "req/s", "p99 ms", "errors"],
              rows),
    ]


def rate_section(runs, machine):
    direct = figures(runs, "direct")
    ref = figures(runs, "nginx")
    rows = []
    added = {}
    added50 = {}
    for target in TARGETS:
        f = figures(runs, target)
        if not f["rounds"]:
            continue
        add50 = f["p50"] - direct["p50"] if None not in (f["p50"], direct["p50"]) else None
        add99 = f["p99"] - direct["p99"] if None not in (f["p99"], direct["p99"]) else None
        added[target] = add99
        added50[target] = add50
        rows.append([
            LABEL[target] + measured_note(f),
            fmt_rps(f["rps"]),
            fmt_ms(f["p50"]), fmt_ratio(f["p50"], ref["p50"]),
            fmt_ms(f["p99"]), fmt_ratio(f["p99"], ref["p99"]),
            "–" if target == "direct" else fmt_ms(add50),
            "–" if target == "direct" else fmt_ms(add99),
            fmt_errors(f),
        ])
    rate = machine.get("fixed rate", "5000 requests/s, 32 connections, 8 s")
    out = [
        f"## Latency at a fixed rate: oha, {rate}, on `/`",
        "",
        "Medians over the rounds. *added* is the target's median minus the backend's median when called "
        "directly: what the proxy hop costs at this rate.",
        "",
        table(["target", "achieved req/s", "p50 ms", "× nginx", "p99 ms", "× nginx", "added p50 ms",
               "added p99 ms", "errors"], rows),
    ]
    if None not in (added50.get("balancer"), added50.get("floor")):
        out += ["", f"The balancer's added p50 is {fmt_ms(added50['balancer'])} ms against the floor's "
                    f"{fmt_ms(added50['floor'])} ms: {fmt_ms(added50['balancer'] - added50['floor'])} ms of it "
                    "is the balancer's own."]
    if added.get("balancer") is not None:
        line = f"**The balancer adds {fmt_ms(added['balancer'])} ms at p99** over calling the backend directly"
        if added.get("nginx") is not None:
            line += f" (nginx adds {fmt_ms(added['nginx'])} ms"
            if added.get("haproxy") is not None:
                line += f", HAProxy {fmt_ms(added['haproxy'])} ms"
            line += ")"
        out += ["", line + "."]
    return out


def machine_section(machine):
    keys = ["date", "nproc", "cpu", "memory", "kernel", "os", "nginx", "haproxy", "wrk", "oha", "rustc",
            "commit", "open files limit", "load average at start", "load average at end", "rounds",
            "fixed rate"]
    rows = [[k, machine[k]] for k in keys if machine.get(k)]
    return ["## Machine", "", table(["", ""], rows)]


def chart(runs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is missing, no chart", file=sys.stderr)
        return False
    colors = {"balancer": "#d9534f", "floor": "#f0ad4e", "nginx": "#2e8b57", "haproxy": "#4a77b4", "direct": "#999999"}
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    width = 0.16
    for i, target in enumerate(TARGETS):
        xs, heights, lo, hi = [], [], [], []
        for j, p in enumerate(PATHS):
            f = figures(runs, target, p)
            if f["rps"] is None:
                continue
            xs.append(j + (i - (len(TARGETS) - 1) / 2) * width)
            heights.append(f["rps"])
            lo.append(f["rps"] - f["rps_min"])
            hi.append(f["rps_max"] - f["rps"])
        if not xs:
            continue
        bars = ax.bar(xs, heights, width, label=LABEL[target], color=colors[target],
                      yerr=[lo, hi], capsize=3, error_kw={"elinewidth": 1})
        # Inside the bars, clear of the error bars on top of them.
        ax.bar_label(bars, labels=[f"{h / 1000:.1f}k" for h in heights], label_type="center",
                     rotation=90, color="white", fontsize=9, fontweight="bold")
    ax.set_xticks(range(len(PATHS)))
    ax.set_xticklabels([f"{p}" + (" (cache hit)" if p == "/cache-me" else "") for p in PATHS])
    ax.set_ylabel("requests/s (median; bars: min–max over rounds)")
    ax.set_title("wrk -t1 -c64, one worker/thread per proxy, same backend, loopback")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(results):
    raw = results / "raw"
    runs, machine = load(raw)
    held_conns = next((m.group(1) for f in raw.glob("c*-r*.txt") for m in [re.match(r"c(\d+)-", f.name)] if m), "1000")
    has_chart = chart(runs["wrk"], results / "chart.png")
    out = [
        "# Benchmark: the balancer against its floor, nginx and HAProxy",
        "",
        "Written by `bench/run.sh` (see `bench/README.md` for what is measured and how to read it). "
        "Everything on 127.0.0.1: one backend (`backend --workers 1`) behind every proxy; each proxy with one "
        "worker/thread: the balancer (`threads = 1`, `bench/balancer.toml`), the floor (`bench/floor`, "
        "`--threads 1`), nginx (`worker_processes 1`, "
        "`bench/nginx.conf`), HAProxy (`nbthread 1`, `bench/haproxy.cfg`). Rounds are interleaved: each round "
        "runs every target in turn, in an order that turns by one each round.",
        "",
    ]
    if machine.get("note"):
        out += [f"> {machine['note']}", ""]
    if has_chart:
        out += ["![requests/s per path and target](chart.png)", ""]
    out += throughput_section(runs["wrk"]) + [""]
    out += cpu_section(runs["wrk"]) + [""]
    out += held_section(runs["held"], held_conns) + [""]
    out += rate_section(runs["rate"], machine) + [""]
    out += machine_section(machine) + [""]
    checks = raw / "checks.txt"
    if checks.exists():
        out += ["## Checks before measuring", "", "```", checks.read_text().rstrip(), "```", ""]
    out += ["Raw output of every run: `raw/` (wrk text with run.sh's `# key: value` lines; oha summaries as JSON)."]
    (results / "results.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--trim-oha":
        trim_oha(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "--percentiles":
        measured = parse_oha(Path(sys.argv[2]))
        if measured["errors"] == 0 and None not in (measured["p50"], measured["p99"]):
            print(f"{measured['p50']:.4f} {measured['p99']:.4f}")
    elif len(sys.argv) == 2:
        main(Path(sys.argv[1]))
    else:
        sys.exit(__doc__)
