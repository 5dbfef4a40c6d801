#!/usr/bin/env python3
"""Renders the dashboard's panels to a PNG without Grafana (Debian ships none): each panel's
query, exactly as in pbx-operator.json, is evaluated by a real Prometheus over a time range
(query_range), and gnuplot draws the series.

    render.py PROMETHEUS_URL START END OUT.png    (START/END: Unix seconds)

tests/observability.rs (dashboard_picture_from_a_real_run, run by hand) scrapes a running operator
with Prometheus and calls this; the chart README's dashboard.png comes from it.
"""
import json, os, subprocess, sys, tempfile, urllib.parse, urllib.request

here = os.path.dirname(os.path.abspath(__file__))
url, start, end, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
dash = json.load(open(os.path.join(here, "pbx-operator.json")))
step = max(2, int((end - start) / 120))

def query(expr):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}") as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]

def legend(fmt, labels):
    text = fmt
    for k, v in labels.items():
        text = text.replace("{{" + k + "}}", v)
    return text.replace("{{", "").replace("}}", "") or "value"

work = tempfile.mkdtemp(prefix="pbx-dash-")
panels = dash["panels"]
cols, rows = 2, (len(panels) + 1) // 2
script = [
    f'set terminal pngcairo size 1100,{rows * 190 + 40} font "DejaVu Sans,8"',
    f'set output "{out}"',
    f'set multiplot layout {rows},{cols} title "pbx-operator dashboard: panel queries evaluated by Prometheus on a real run (not Grafana)" font ",10"',
    "set xdata time", 'set timefmt "%s"', 'set format x "%M:%S"',
    "set key top left font ',7' samplen 1", "set grid", "set tics font ',7'",
    "set lmargin 9", "set style data lines", "set termoption noenhanced",
    f"set xrange [{start}:{end}]", "set offsets 0, 0, graph 0.12, 0",
]
for i, p in enumerate(panels):
    t = p["targets"][0]
    result = query(t["expr"])
    unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    scale, ylabel = 1, unit
    if unit == "bytes":
        scale, ylabel = 1 / (1024 * 1024), "MiB"
    elif unit == "s":
        scale, ylabel = 1000, "ms"
    script.append(f'set title "{p["title"]}" font ",9"')
    script.append(f'set ylabel "{ylabel}" font ",7"')
    plots = []
    for j, s in enumerate(result[:8]):
        f = os.path.join(work, f"p{i}s{j}.dat")
        with open(f, "w") as fh:
            for ts, v in s["values"]:
                if v not in ("NaN", "+Inf", "-Inf"):
                    fh.write(f"{ts} {float(v) * scale}\n")
        name = legend(t.get("legendFormat", ""), s["metric"]).replace('"', "'")
        if os.path.getsize(f) > 0:
            plots.append(f'"{f}" using 1:2 title "{name}" lw 1.5')
    if plots:
        script.append("set yrange [0:*]")
        script.append("plot " + ", ".join(plots))
    else:
        script.append('set label 1 "no data" at graph 0.45,0.5')
        script.append("plot 1/0 notitle")
        script.append("unset label 1")
script.append("unset multiplot")
gp = os.path.join(work, "dash.gp")
open(gp, "w").write("\n".join(script) + "\n")
subprocess.run(["gnuplot", gp], check=True)
print(out, os.path.getsize(out), "bytes")
