# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The run's report, computed from its trace (run_trace.py): a row per attempt (trace.tsv), what the run
cost, a timeline picture and one self-contained HTML page. The run_report module reads the trace and
writes the files; this file computes. Besides the collection's run_trace and job, it imports only the
standard library, and matplotlib when it draws.

Cost: every worker run's machine time (from the machine's launch, when the record says it, else the worker's
start, to the worker's stop) at its instance type's hourly price in its region and market, plus the S3
requests its client sent at S3's price by how S3 bills them. A task's share: its attempts' time on a slot
(the machine's time split between its slots) and the requests charged to them. Prices come from PRICES,
dated, unless the caller gives its own (the AWS price list and spot price history, or a user's table).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
import time

from ansible_collections.cicc.cloud.plugins.module_utils import job
from ansible_collections.cicc.cloud.plugins.module_utils import run_trace
from ansible_collections.cicc.cloud.plugins.module_utils.run_trace import TIMES

# USD an hour for a Linux instance, and USD a request for S3 Standard, by region. On-demand from the AWS
# price list; spot a typical price in that region's zones (spot prices move: read the history for a bill).
PRICES = {
    "date": "2026-11-01",
    "source": "table shipped with cicc.cloud: AWS on-demand price list, typical spot prices",
    "instances": {
        "us-east-1": {
            "c4.large": {"on-demand": 0.100, "spot": 0.035},
            "c5.large": {"on-demand": 0.085, "spot": 0.033},
            "c5.xlarge": {"on-demand": 0.170, "spot": 0.066},
            "c6i.large": {"on-demand": 0.085, "spot": 0.034},
            "c7i.large": {"on-demand": 0.08925, "spot": 0.036},
            "m5.large": {"on-demand": 0.096, "spot": 0.039},
            "m6i.large": {"on-demand": 0.096, "spot": 0.038},
            "r5.large": {"on-demand": 0.126, "spot": 0.042},
            "t3.micro": {"on-demand": 0.0104, "spot": 0.0035},
            "t3.medium": {"on-demand": 0.0416, "spot": 0.0145},
        },
        "us-west-2": {
            "c4.large": {"on-demand": 0.100, "spot": 0.038},
            "c5.large": {"on-demand": 0.085, "spot": 0.035},
            "c6i.large": {"on-demand": 0.085, "spot": 0.036},
            "m5.large": {"on-demand": 0.096, "spot": 0.040},
            "t3.micro": {"on-demand": 0.0104, "spot": 0.0036},
            "t3.medium": {"on-demand": 0.0416, "spot": 0.0150},
        },
        "eu-west-1": {
            "c4.large": {"on-demand": 0.113, "spot": 0.040},
            "c5.large": {"on-demand": 0.096, "spot": 0.037},
            "c6i.large": {"on-demand": 0.096, "spot": 0.038},
            "m5.large": {"on-demand": 0.107, "spot": 0.042},
            "t3.micro": {"on-demand": 0.0114, "spot": 0.0038},
            "t3.medium": {"on-demand": 0.0456, "spot": 0.0160},
        },
    },
    "s3_requests": {
        "us-east-1": {"write": 0.005 / 1000, "read": 0.0004 / 1000},
        "us-west-2": {"write": 0.005 / 1000, "read": 0.0004 / 1000},
        "eu-west-1": {"write": 0.005 / 1000, "read": 0.0004 / 1000},
    },
}

# vCPUs and memory (MiB) of the instance types in PRICES: how many tasks of a job one runs at once, before any
# trace says so.
INSTANCE_SIZES = {
    "c4.large": (2, 3840),
    "c5.large": (2, 4096),
    "c5.xlarge": (4, 8192),
    "c6i.large": (2, 4096),
    "c7i.large": (2, 4096),
    "m5.large": (2, 8192),
    "m6i.large": (2, 8192),
    "r5.large": (2, 16384),
    "t3.micro": (2, 1024),
    "t3.medium": (2, 4096),
}
# Seconds from a machine's launch to its worker's start, unless the caller knows better.
START_SECONDS = 60.0

# trace.tsv's columns, in order: a trace row's fields, then what the report adds.
TSV_FIELDS = (
    "job",
    "task",
    "attempt",
    "outcome",
    "reason",
    "exit_code",
    "worker",
    "slot",
    "instance_id",
    "instance_type",
    "availability_zone",
    "market",
    "claimed_at",
    "staged_at",
    "started_at",
    "ended_at",
    "published_at",
    "seconds",
    "bytes_in",
    "bytes_out",
    "input_etag",
    "output_etags",
    "image",
    "image_id",
    "ami_id",
    "code_version",
    "requests",
    "write_requests",
    "read_requests",
    "cost_usd",
)
# Bar colours of the timeline by outcome (run_trace's OUTCOMES), and of a machine's time outside attempts.
COLOURS = {
    run_trace.DONE: "#2e7d32",
    run_trace.RETRIED: "#f9a825",
    run_trace.FAILED: "#c62828",
    run_trace.GIVEN_BACK: "#1565c0",
    run_trace.LOST: "#6a1b9a",
    run_trace.ABANDONED: "#616161",
}
BOOT_COLOUR, START_COLOUR, IDLE_COLOUR = "#78909c", "#b0bec5", "#eceff1"


def merged_prices(overrides: dict | None = None) -> dict:
    """PRICES with ``overrides`` laid over it, region by region and type by type (a user's own table, or
    prices read from AWS): what is not overridden keeps the shipped price."""
    prices = {key: value for key, value in PRICES.items() if key not in ("instances", "s3_requests")}
    prices["instances"] = {
        region: {kind: dict(markets) for kind, markets in kinds.items()}
        for region, kinds in PRICES["instances"].items()
    }
    prices["s3_requests"] = {region: dict(classes) for region, classes in PRICES["s3_requests"].items()}
    for key, value in (overrides or {}).items():
        if key == "instances":
            for region, kinds in value.items():
                for kind, markets in kinds.items():
                    prices[key].setdefault(region, {}).setdefault(kind, {}).update(markets)
        elif key == "s3_requests":
            for region, classes in value.items():
                prices[key].setdefault(region, {}).update(classes)
        else:
            prices[key] = value
    return prices


# --- prices read from AWS: the Price List API (on-demand) and the spot price history of the run's zones ---

PRICE_LIST_REGION = "us-east-1"  # where the Price List API answers; it prices every region


def price_list_filters(region: str, instance_type: str) -> list[dict]:
    """The Price List API's filters for a Linux instance on shared tenancy, on demand, in ``region``."""
    fields = {
        "instanceType": instance_type,
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }
    return [{"Type": "TERM_MATCH", "Field": field, "Value": value} for field, value in fields.items()]


def on_demand_price(price_list: list[str]) -> float | None:
    """USD an hour from the Price List API's products (JSON strings): the first on-demand hourly price above 0."""
    for product in price_list:
        for term in json.loads(product).get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = float(dimension.get("pricePerUnit", {}).get("USD", 0) or 0)
                if usd > 0 and dimension.get("unit", "Hrs").startswith("Hr"):
                    return usd
    return None


def spot_price(history: list[dict], since: float, until: float) -> float | None:
    """USD an hour a spot machine paid on average over [since, until] (seconds since the epoch): a price holds
    from its Timestamp until the zone's next one; each zone's prices averaged over the window's time, then the
    zones averaged. None when the history has no price in force in the window."""
    by_zone: dict[str, list[tuple[float, float]]] = {}
    for point in history:
        stamp = point["Timestamp"]
        at = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
        by_zone.setdefault(point.get("AvailabilityZone", ""), []).append((at, float(point["SpotPrice"])))
    means = []
    for points in by_zone.values():
        points = sorted(point for point in points if point[0] <= until)
        spans = [
            (min(following, until) - max(at, since), price)
            for (at, price), following in zip(points, [at for at, dummy in points[1:]] + [until])
        ]
        spent = sum(span for span, dummy in spans if span > 0)
        if spent:
            means.append(sum(span * price for span, price in spans if span > 0) / spent)
        elif points:  # a window of no length: the price in force then
            means.append(points[-1][1])
    return sum(means) / len(means) if means else None


def region_of(zone: str, default: str) -> str:
    """us-east-1a -> us-east-1 (a zone's region); ``default`` when the zone is not known."""
    return zone.rstrip("abcdefghijklmnopqrstuvwxyz") if zone and zone[-1].isalpha() else default


def instance_price(prices: dict, region: str, instance_type: str, market: str) -> float | None:
    """USD an hour, or None when the table has no price for it."""
    found = prices["instances"].get(region, {}).get(instance_type, {})
    return found.get(market or "on-demand")


def _request_prices(prices: dict, region: str) -> dict:
    table = prices["s3_requests"]
    return table.get(region) or table["us-east-1"]


def _requests_usd(counted: dict, request_price: dict) -> float:
    """What S3 bills for the requests ``counted`` ("write_requests" and "read_requests", a row's or a record's)."""
    return (
        counted.get("write_requests", 0) * request_price["write"]
        + counted.get("read_requests", 0) * request_price["read"]
    )


def cost(rows: list[dict], workers: list[dict], prices: dict, region: str) -> dict:
    """What the run cost: machine time by instance type and market, S3 requests by how S3 bills them, the
    bytes moved; each row's share goes into its "cost_usd". Machines the table has no price for are listed
    in "unpriced" and counted at 0."""
    machines: dict[tuple, dict] = {}
    per_slot_second: dict[str, float] = {}
    unpriced = set()
    requests = {"write": 0, "read": 0}
    for record, began in zip(workers, machine_starts(workers)):
        machine_region = region_of(record.get("availability_zone", ""), region)
        key = (record.get("instance_type") or "unknown", record.get("market") or "on-demand", machine_region)
        hourly = instance_price(prices, machine_region, key[0], key[1])
        if hourly is None:
            unpriced.add(f"{key[0]} ({key[1]}, {machine_region})")
        seconds = max(record["stopped_at"] - began, 0.0)
        entry = machines.setdefault(key, {"machines": set(), "seconds": 0.0, "usd_an_hour": hourly or 0.0})
        entry["machines"].add(record.get("instance_id") or record["worker"])
        entry["seconds"] += seconds
        per_slot_second[record["worker"]] = (hourly or 0.0) / 3600 / max(record.get("slots", 1), 1)
        requests["write"] += record.get("write_requests", 0)
        requests["read"] += record.get("read_requests", 0)
    request_price = _request_prices(prices, region)
    for row in rows:
        busy = max(row["ended_at"] - row["claimed_at"], 0.0)
        row["cost_usd"] = busy * per_slot_second.get(row["worker"], 0.0) + _requests_usd(row, request_price)
    by_type = [
        {
            "instance_type": instance_type,
            "market": market,
            "region": machine_region,
            "machines": len(entry["machines"]),
            "seconds": round(entry["seconds"], 3),
            "usd_an_hour": entry["usd_an_hour"],
            "usd": entry["seconds"] / 3600 * entry["usd_an_hour"],
        }
        for (instance_type, market, machine_region), entry in sorted(machines.items())
    ]
    s3_usd = sum(_requests_usd(record, request_price) for record in workers)
    machines_usd = sum(entry["usd"] for entry in by_type)
    return {
        "usd": machines_usd + s3_usd,
        "machines_usd": machines_usd,
        "s3_usd": s3_usd,
        "machines": by_type,
        "s3_requests": requests,
        "s3_request_prices": request_price,
        "bytes_in": sum(row.get("bytes_in", 0) for row in rows),
        "bytes_out": sum(row.get("bytes_out", 0) for row in rows),
        "unpriced": sorted(unpriced),
        "prices_date": prices.get("date", ""),
        "prices_source": prices.get("source", ""),
    }


def machine_starts(workers: list[dict]) -> list[float]:
    """When each worker run's machine time began: the machine's launch (its boot) when known, else the worker's
    start; a later run of the worker on the same machine from its own start (the machine's time counted once)."""
    first = {}
    for record in workers:
        machine = record.get("instance_id") or id(record)
        first[machine] = min(first.get(machine, record["started_at"]), record["started_at"])
    starts = []
    for record in workers:
        launched = float(record.get("launched_at") or 0.0)
        earliest = first[record.get("instance_id") or id(record)] == record["started_at"]
        starts.append(launched if earliest and 0 < launched <= record["started_at"] else record["started_at"])
    return starts


def summary(rows: list[dict], workers: list[dict]) -> dict:
    """Counts by outcome, tasks, machines and slots, the wall time and the failures with their reasons."""
    outcomes: dict[str, int] = {}
    for row in rows:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    starts = machine_starts(workers) + [row["claimed_at"] for row in rows]
    ends = [record["stopped_at"] for record in workers] + [row["ended_at"] for row in rows]
    return {
        "attempts": len(rows),
        "tasks": len({row["task"] for row in rows}),
        "outcomes": dict(sorted(outcomes.items())),
        "machines": len({record.get("instance_id") or record["worker"] for record in workers}),
        "worker_runs": len(workers),
        "slots": len(lanes(rows, workers)),
        "wall_seconds": round(max(ends) - min(starts), 3) if starts and ends else 0.0,
        "failures": [
            {"task": row["task"], "attempt": row["attempt"], "outcome": row["outcome"], "reason": row["reason"]}
            for row in rows
            if row["outcome"] not in (run_trace.DONE, run_trace.GIVEN_BACK)
        ],
    }


def _iso(seconds: float) -> str:
    if not seconds:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f"{seconds % 1:.3f}"[1:] + "Z"


def _cell(value) -> str:
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    text = "" if value is None else str(value)
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


def tsv_row(row: dict) -> dict:
    """A trace row as trace.tsv writes it: times in UTC (ISO 8601), ETags without their quotes, the attempt's
    seconds, the cost rounded."""
    values = dict(row)
    for name in TIMES:
        values[name] = _iso(row.get(name, 0.0))
    values["input_etag"] = row.get("input_etag", "").strip('"')  # a TSV reader takes quotes for quoting
    values["output_etags"] = [etag.strip('"') for etag in row.get("output_etags", [])]
    values["seconds"] = f"{max(row['ended_at'] - row['claimed_at'], 0.0):.3f}"
    values["cost_usd"] = f"{row.get('cost_usd', 0.0):.8f}"
    return values


def trace_tsv(rows: list[dict]) -> str:
    """trace.tsv: a header, then one line per attempt, tab-separated."""
    lines = ["\t".join(TSV_FIELDS)]
    for row in rows:
        values = tsv_row(row)
        lines.append("\t".join(_cell(values.get(name, "")) for name in TSV_FIELDS))
    return "\n".join(lines) + "\n"


def lanes(rows: list[dict], workers: list[dict]) -> list[str]:
    """The timeline's lanes: every worker slot that made an attempt, and every worker run that made none."""
    slots = sorted({row["slot"] or row["worker"] for row in rows})
    busy = {row["worker"] for row in rows}
    return slots + sorted({record["worker"] for record in workers if record["worker"] not in busy})


def timeline_png(rows: list[dict], workers: list[dict]) -> bytes:
    """The timeline picture (PNG): a lane per worker slot, a bar per attempt from its claim to its end coloured
    by outcome (lighter while its input was staged), and each machine's boot, start and idle time in its lanes."""
    import matplotlib  # the controller's only drawing dependency: imported when a picture is drawn

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Patch

    names = lanes(rows, workers)
    index = {name: number for number, name in enumerate(names)}
    origin = min(
        machine_starts(workers) + [row["claimed_at"] for row in rows],
        default=0.0,
    )
    height = min(max(2.0 + 0.25 * len(names), 3.0), 14.0)
    figure, axes = pyplot.subplots(figsize=(11, height), dpi=100, layout="constrained")
    thickness = 0.8 if len(names) <= 200 else 1.0
    for record, launched in zip(workers, machine_starts(workers)):
        worker_lanes = [number for name, number in index.items() if name == record["worker"] or _slot_of(name, record)]
        booted, began_work = launched - origin, record["started_at"] - origin
        first = (record.get("first_claim_at") or record["stopped_at"]) - origin
        for number in worker_lanes:
            lane = (number - thickness / 2, thickness)
            axes.broken_barh([(booted, began_work - booted)], lane, color=BOOT_COLOUR, linewidth=0)
            axes.broken_barh([(began_work, first - began_work)], lane, color=START_COLOUR, linewidth=0)
            axes.broken_barh(
                [(first, record["stopped_at"] - origin - first)],
                (number - thickness / 2, thickness),
                color=IDLE_COLOUR,
                linewidth=0,
            )
    for row in rows:
        number = index[row["slot"] or row["worker"]]
        claimed, ended = row["claimed_at"] - origin, row["ended_at"] - origin
        started = (row.get("started_at") or row["claimed_at"]) - origin
        colour = COLOURS.get(row["outcome"], COLOURS[run_trace.ABANDONED])
        axes.broken_barh(
            [(claimed, max(started - claimed, 0.0))], (number - thickness / 2, thickness), color=colour, alpha=0.45
        )
        axes.broken_barh([(started, max(ended - started, 0.0))], (number - thickness / 2, thickness), color=colour)
    axes.set_ylim(-1, len(names))
    axes.invert_yaxis()
    if len(names) <= 60:
        axes.set_yticks(range(len(names)), names, fontsize=8 if len(names) > 20 else 9)
    else:
        axes.set_yticks([])
        axes.set_ylabel(f"{len(names)} worker slots")
    axes.set_xlabel("seconds since the first machine was launched")
    axes.grid(axis="x", linewidth=0.3)
    legend = [Patch(color=colour, label=outcome) for outcome, colour in COLOURS.items()]
    legend += [Patch(color=BOOT_COLOUR, label="boot"), Patch(color=START_COLOUR, label="start, before the first claim")]
    legend.append(Patch(color=IDLE_COLOUR, label="idle"))
    figure.legend(handles=legend, loc="outside lower center", ncol=9, fontsize=8, frameon=False)
    axes.set_title(f"{len(rows)} attempts on {len(names)} slots")
    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": None})
    pyplot.close(figure)
    return out.getvalue()


def _slot_of(lane: str, record: dict) -> bool:
    """Whether the lane is one of the worker's slots ("<worker>#<n>")."""
    return lane.startswith(record["worker"] + "#") and lane[len(record["worker"]) + 1 :].isdigit()


def _table(headers: list[str], body: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in headers)
    lines = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(value))}</td>" for value in line) + "</tr>" for line in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"


def html_page(title: str, rows: list[dict], facts: dict, costs: dict, png: bytes, settings: dict, outputs: dict) -> str:
    """The report as one self-contained HTML page: the summary (``facts``, what summary() says), failures, stale
    outputs (``outputs``: what task_queue.check_outputs found, when the caller checked), cost, the timeline, every
    attempt, and the run's settings and versions."""
    outcome_line = ", ".join(f"{count} {outcome}" for outcome, count in facts["outcomes"].items()) or "none"
    overview = _table(
        ["", ""],
        [
            ["tasks", facts["tasks"]],
            ["attempts", f"{facts['attempts']} ({outcome_line})"],
            ["machines", f"{facts['machines']} ({facts['worker_runs']} worker runs, {facts['slots']} slots)"],
            ["wall time", f"{facts['wall_seconds']:.1f} s"],
            ["cost", f"USD {costs['usd']:.6f} (machines {costs['machines_usd']:.6f}, S3 {costs['s3_usd']:.6f})"],
            ["bytes in / out", f"{costs['bytes_in']} / {costs['bytes_out']}"],
        ],
    )
    failures = (
        _table(["task", "attempt", "outcome", "reason"], [list(failure.values()) for failure in facts["failures"]])
        if facts["failures"]
        else "<p>No attempt failed.</p>"
    )
    stale = outputs.get("stale", [])
    checked = (
        (_table(["task", "why"], [[entry["task"], entry["why"]] for entry in stale]) if stale else "")
        + f"<p>{outputs.get('checked', 0)} outputs checked against their manifests: {len(stale)} stale, "
        f"{len(outputs.get('wrong', []))} not as published, {len(outputs.get('without_manifest', []))} without "
        "provenance (made before manifests, or by hand).</p>"
        if outputs
        else "<p>Outputs not checked in this report.</p>"
    )
    machines = _table(
        ["instance type", "market", "region", "machines", "seconds", "USD an hour", "USD"],
        [
            [
                entry["instance_type"],
                entry["market"],
                entry["region"],
                entry["machines"],
                f"{entry['seconds']:.1f}",
                entry["usd_an_hour"],
                f"{entry['usd']:.6f}",
            ]
            for entry in costs["machines"]
        ],
    )
    requests = costs["s3_requests"]
    prices = costs["s3_request_prices"]
    priced = (
        f"<p>S3: {requests['write']} write requests at USD {prices['write']:.7f}, {requests['read']} read requests at "
        f"USD {prices['read']:.7f}. Prices: {html.escape(costs['prices_source'])}, dated "
        f"{html.escape(costs['prices_date'])}.</p>"
    )
    if costs["unpriced"]:
        priced += f"<p>No price known for: {html.escape(', '.join(costs['unpriced']))} (counted at 0).</p>"
    columns = ["task", "attempt", "outcome", "reason", "slot", "claimed_at", "started_at", "ended_at", "seconds"]
    columns += ["bytes_in", "bytes_out", "requests", "cost_usd"]
    attempts = _table(columns, [[tsv_row(row).get(name, "") for name in columns] for row in rows])
    chosen = _table(["setting", "value"], [[key, value] for key, value in sorted(settings.items())])
    versions = sorted({(row.get("code_version", ""), row.get("image", ""), row.get("image_id", "")) for row in rows})
    version_table = _table(["worker code", "image", "image id"], [list(version) for version in versions])
    picture = base64.b64encode(png).decode() if png else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>{overview}
<h2>Failures</h2>{failures}
<h2>Stale outputs</h2>{checked}
<h2>Cost</h2>{machines}{priced}
<h2>Timeline</h2>{f'<img alt="timeline" src="data:image/png;base64,{picture}">' if picture else "<p>No picture.</p>"}
<h2>Attempts</h2>{attempts}
<h2>Settings and versions</h2>{chosen}{version_table}
</body></html>
"""


def plan(
    pending: int,
    rows: list[dict],
    workers: list[dict],
    prices: dict,
    machine: dict,
    fleet_size: int,
    task_seconds: float = 0.0,
    start_seconds: float = START_SECONDS,
    deadline_seconds: float = 0.0,
) -> dict:
    """What a run would do, before anything is launched: the machines (never more than there is work for), the
    expected wall time and cost, and for a deadline the fleet size that meets it. ``machine``: instance_type,
    market, region, the job's cpus and memory_mib, max_tasks (a machine's task limit, 0: none) and slots (0: from
    the trace, else from INSTANCE_SIZES). A task's time is the median of the earlier done attempts' (the
    trace), else ``task_seconds``; a machine's start, launch to first claim, the median of the trace's, else
    ``start_seconds`` (launch to the worker's start) plus the worker's start to its first claim."""
    done = [row for row in rows if row["outcome"] == run_trace.DONE]
    times = [row["ended_at"] - row["claimed_at"] for row in done]
    per_task, source = (statistics.median(times), "trace") if done else (task_seconds, "given" if task_seconds else "")
    claimed = [
        (record, began) for record, began in zip(workers, machine_starts(workers)) if record.get("first_claim_at")
    ]
    booted = [record["first_claim_at"] - began for record, began in claimed if record.get("launched_at")]
    started = [record["first_claim_at"] - record["started_at"] for record, _began in claimed]
    if booted:  # launch to first claim, as the trace measured it
        start = statistics.median(booted)
    else:
        start = start_seconds + (statistics.median(started) if started else 0.0)
    slots = machine.get("slots") or _slots(machine, workers)
    at_once = min(slots, machine.get("max_tasks") or slots)  # tasks a machine works on at a time
    machines = min(fleet_size, math.ceil(pending / at_once)) if pending else 0
    answer = {
        "pending": pending,
        "machines": machines,
        "slots": slots,
        "task_seconds": round(per_task, 3),
        "task_seconds_from": source,
        "start_seconds": round(start, 3),
    }
    if not per_task or not machines:
        return {**answer, "wall_seconds": None, "usd": None, "deadline_machines": None}
    rounds = math.ceil(pending / (machines * at_once))
    wall = start + rounds * per_task
    hourly = instance_price(prices, machine["region"], machine["instance_type"], machine["market"]) or 0.0
    request_price = _request_prices(prices, machine["region"])
    per_task_requests = sum(_requests_usd(row, request_price) for row in done) / len(done) if done else 0.0
    answer.update(
        wall_seconds=round(wall, 1),
        usd=machines * wall / 3600 * hourly + pending * per_task_requests,
        usd_an_hour=hourly,
        deadline_machines=None,
    )
    if deadline_seconds:
        fit = math.floor((deadline_seconds - start) / per_task)  # rounds of tasks that fit before the deadline
        answer["deadline_machines"] = math.ceil(pending / (fit * at_once)) if fit >= 1 else None
    return answer


def _slots(machine: dict, workers: list[dict]) -> int:
    """Tasks of the job a machine of this type ran at once in the trace, else what its size allows, else 1."""
    seen = [record.get("slots", 1) for record in workers if record.get("instance_type") == machine["instance_type"]]
    if seen:
        return max(seen)
    if machine["instance_type"] not in INSTANCE_SIZES:
        return 1
    return job.slots_for(
        machine.get("cpus", 1), machine.get("memory_mib", 1), *INSTANCE_SIZES[machine["instance_type"]]
    )
