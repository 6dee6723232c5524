"""The run's report from a trace: trace.tsv, the cost, the timeline picture and the HTML page (no emulator: the
trace rows and worker records are made here as the worker writes them)."""

from __future__ import annotations

import csv
import math
import html.parser
import io
import struct

import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import run_report

T0 = 1_800_000_000.0


def _row(task: str, slot: str, start: float, seconds: float, outcome: str = "done", attempt: int = 1) -> dict:
    worker = slot.split("#")[0]
    return {
        "job": "xor",
        "task": task,
        "attempt": attempt,
        "slot": slot,
        "worker": worker,
        "outcome": outcome,
        "reason": "" if outcome == "done" else "exit code 3:\tkernel\nmissing",
        "exit_code": 0 if outcome == "done" else 3,
        "instance_id": f"i-{worker}",
        "instance_type": "c4.large",
        "availability_zone": "us-east-1b",
        "market": "on-demand",
        "claimed_at": T0 + start,
        "staged_at": T0 + start + 0.5,
        "started_at": T0 + start + 1,
        "ended_at": T0 + start + seconds,
        "published_at": T0 + start + seconds + 0.2,
        "bytes_in": 100,
        "bytes_out": 100,
        "input_etag": '"abc"',
        "output_etags": ['"def"'],
        "image": "cicc-process:latest",
        "image_id": "sha256:1234",
        "ami_id": "ami-1",
        "code_version": "0123456789abcdef",
        "requests": 9,
        "write_requests": 4,
        "read_requests": 5,
    }


def _worker(name: str, start: float, stop: float, slots: int = 1, market: str = "on-demand", **more) -> dict:
    return {
        "worker": name,
        "instance_id": f"i-{name}",
        "instance_type": "c4.large",
        "availability_zone": "us-east-1b",
        "market": market,
        "started_at": T0 + start,
        "first_claim_at": T0 + start + 1,
        "stopped_at": T0 + stop,
        "slots": slots,
        "write_requests": 100,
        "read_requests": 1000,
        **more,
    }


@pytest.fixture
def run():
    rows = [_row("in0.dat", "w1#1", 2, 10), _row("in1.dat", "w1#2", 2, 20, "retried")]
    rows += [_row("in1.dat", "w2", 25, 10, attempt=2), _row("in2.dat", "w2", 5, 15)]
    workers = [_worker("w1", 0, 30, slots=2), _worker("w2", 3, 40, market="spot")]
    return rows, workers


def test_trace_tsv_has_one_line_per_attempt_with_ordered_times(run):
    rows = run[0]
    table = list(csv.DictReader(io.StringIO(run_report.trace_tsv(rows)), delimiter="\t"))
    assert [(line["task"], line["attempt"]) for line in table] == [(row["task"], str(row["attempt"])) for row in rows]
    assert list(table[0]) == list(run_report.TSV_FIELDS)
    for line in table:
        times = [line[name] for name in run_report.TIMES]
        assert times == sorted(times) and all(time.endswith("Z") for time in times)  # ISO 8601, UTC: sorts as text
    retried = table[1]
    assert retried["outcome"] == "retried" and retried["reason"] == "exit code 3: kernel missing"  # one line, no tabs
    assert retried["seconds"] == "20.000" and table[0]["output_etags"] == "def" and table[0]["input_etag"] == "abc"


def test_cost_is_machine_time_at_the_table_price_plus_requests(run):
    rows, workers = run
    prices = run_report.merged_prices()
    cost = run_report.cost(rows, workers, prices, "us-east-1")
    on_demand = prices["instances"]["us-east-1"]["c4.large"]["on-demand"]
    spot = prices["instances"]["us-east-1"]["c4.large"]["spot"]
    machines = 30 / 3600 * on_demand + 37 / 3600 * spot
    s3 = 200 * 0.005 / 1000 + 2000 * 0.0004 / 1000
    assert cost["machines_usd"] == pytest.approx(machines) and cost["s3_usd"] == pytest.approx(s3)
    assert cost["usd"] == pytest.approx(machines + s3)
    assert [(entry["market"], entry["machines"], entry["seconds"]) for entry in cost["machines"]] == [
        ("on-demand", 1, 30.0),
        ("spot", 1, 37.0),
    ]
    # A task's share: its time on a slot (w1's time split between its two slots) and its own requests.
    assert rows[0]["cost_usd"] == pytest.approx(10 * on_demand / 3600 / 2 + 4 * 0.005 / 1000 + 5 * 0.0004 / 1000)
    assert cost["prices_date"] == run_report.PRICES["date"] and cost["unpriced"] == []


def test_prices_given_override_the_table_and_unknown_machines_are_named(run):
    rows, workers = run
    workers.append(_worker("w3", 0, 3600, instance_type="x9.huge"))
    prices = run_report.merged_prices({"date": "2027-01-01", "instances": {"us-east-1": {"c4.large": {"spot": 1.0}}}})
    cost = run_report.cost(rows, workers, prices, "us-east-1")
    assert (
        prices["instances"]["us-east-1"]["c4.large"]["on-demand"]
        == run_report.PRICES["instances"]["us-east-1"]["c4.large"]["on-demand"]
    )
    spot = next(entry for entry in cost["machines"] if entry["market"] == "spot")
    assert spot["usd"] == pytest.approx(37 / 3600 * 1.0)
    assert cost["unpriced"] == ["x9.huge (on-demand, us-east-1)"] and cost["prices_date"] == "2027-01-01"
    assert run_report.PRICES["instances"]["us-east-1"]["c4.large"]["spot"] != 1.0  # the shipped table is untouched


def test_a_zone_names_its_region():
    assert run_report.region_of("eu-west-1c", "us-east-1") == "eu-west-1"
    assert run_report.region_of("", "us-west-2") == "us-west-2"


def _product(usd: str, unit: str = "Hrs") -> str:
    """One product of the Price List API's answer (get_products' PriceList holds these as JSON strings)."""
    import json

    dimension = {"unit": unit, "pricePerUnit": {"USD": usd}, "description": "On Demand Linux c4.large"}
    term = {"priceDimensions": {"SKU.TERM.RATE": dimension}, "sku": "SKU", "offerTermCode": "JRTCKXETXF"}
    product = {"attributes": {"instanceType": "c4.large", "regionCode": "us-east-1"}, "sku": "SKU"}
    return json.dumps({"product": product, "terms": {"OnDemand": {"SKU.JRTCKXETXF": term}}})


def test_the_price_list_gives_the_hourly_on_demand_price():
    assert run_report.on_demand_price([_product("0.0000000000"), _product("0.1000000000")]) == 0.1
    assert run_report.on_demand_price([_product("7.5", unit="Quantity")]) is None
    assert run_report.on_demand_price([]) is None
    filters = {entry["Field"]: entry["Value"] for entry in run_report.price_list_filters("eu-west-1", "m5.large")}
    assert filters["regionCode"] == "eu-west-1" and filters["instanceType"] == "m5.large"


def test_the_spot_price_is_averaged_over_the_run_and_its_zones():
    """A price holds from its timestamp until the zone's next one: the run's share of each, then the zones' mean."""
    history = [
        {"AvailabilityZone": "us-east-1a", "SpotPrice": "0.030", "Timestamp": T0 - 500},  # in force at the start
        {"AvailabilityZone": "us-east-1a", "SpotPrice": "0.060", "Timestamp": T0 + 300},  # from a quarter in
        {"AvailabilityZone": "us-east-1a", "SpotPrice": "0.900", "Timestamp": T0 + 2000},  # after the run
        {"AvailabilityZone": "us-east-1b", "SpotPrice": "0.040", "Timestamp": T0 - 100},
    ]
    zone_a = (300 * 0.030 + 900 * 0.060) / 1200
    assert run_report.spot_price(history, T0, T0 + 1200) == pytest.approx((zone_a + 0.040) / 2)
    assert run_report.spot_price(history, T0 + 400, T0 + 400) == pytest.approx((0.060 + 0.040) / 2)
    assert run_report.spot_price(history, T0 - 2000, T0 - 1000) is None


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_timeline_has_a_lane_per_worker_slot(run):
    rows, workers = run
    workers.append(_worker("w3", 0, 5))  # started and found nothing to do: a lane of its own
    assert run_report.lanes(rows, workers) == ["w1#1", "w1#2", "w2", "w3"]
    width, height = _png_size(run_report.timeline_png(rows, workers))
    assert width == 1100 and height >= 300
    many = [_row(f"in{n}.dat", f"w{n % 250}", n % 7, 3) for n in range(1000)]
    fleet = [_worker(f"w{n}", 0, 12) for n in range(250)]
    assert len(run_report.lanes(many, fleet)) == 250
    assert _png_size(run_report.timeline_png(many, fleet))[1] <= 1400  # 1,000 tasks still one readable picture
    assert run_report.timeline_png(rows, workers) == run_report.timeline_png(rows, workers)  # same run, same file


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.images: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self._in_cell = tag == "td"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def test_the_page_holds_every_task_the_failures_the_cost_and_the_picture(run):
    rows, workers = run
    cost = run_report.cost(rows, workers, run_report.merged_prices(), "us-east-1")
    png = run_report.timeline_png(rows, workers)
    outputs = {"checked": 3, "stale": [{"task": "in2.dat", "why": "input in2.dat changed since"}], "wrong": []}
    facts = run_report.summary(rows, workers)
    page = run_report.html_page("run <1>", rows, facts, cost, png, {"job": "xor", "fleet_size": 2}, outputs)
    parsed = _Page()
    parsed.feed(page)
    assert {"in0.dat", "in1.dat", "in2.dat"} <= set(parsed.cells)
    assert "exit code 3: kernel missing" in parsed.cells and "xor" in parsed.cells
    assert "input in2.dat changed since" in parsed.cells  # the stale output, with why
    assert parsed.images == ["data:image/png;base64," + __import__("base64").b64encode(png).decode()]
    assert "<title>run &lt;1&gt;</title>" in page and f"{cost['usd']:.6f}" in page
    assert facts["tasks"] == 3 and facts["attempts"] == 4 and facts["outcomes"] == {"done": 3, "retried": 1}
    assert facts["machines"] == 2 and facts["slots"] == 3 and facts["wall_seconds"] == pytest.approx(40.0)
    assert [failure["task"] for failure in facts["failures"]] == ["in1.dat"]


MACHINE = {"instance_type": "c4.large", "market": "on-demand", "region": "us-east-1", "cpus": 1, "memory_mib": 512}


def test_the_plan_launches_no_more_machines_than_there_is_work_for(run):
    rows, workers = run  # done attempts of 10, 10 and 15 s; w1 ran 2 slots of c4.large
    prices = run_report.merged_prices()
    planned = run_report.plan(5, rows, workers, prices, MACHINE, fleet_size=10, start_seconds=30)
    assert planned["slots"] == 2 and planned["machines"] == 3  # ceil(5 / 2), not 10
    assert planned["task_seconds"] == 10 and planned["task_seconds_from"] == "trace"
    assert planned["start_seconds"] == 31  # 30 to the worker's start, 1 from there to its first claim
    assert planned["wall_seconds"] == 31 + 10  # one round of tasks on 3 machines of 2 slots
    requests = (4 * 0.005 + 5 * 0.0004) / 1000
    assert planned["usd"] == pytest.approx(3 * 41 / 3600 * 0.100 + 5 * requests)
    one_at_a_time = run_report.plan(5, rows, workers, prices, {**MACHINE, "max_tasks": 1}, fleet_size=10)
    assert one_at_a_time["machines"] == 5
    assert run_report.plan(0, rows, workers, prices, MACHINE, fleet_size=10)["machines"] == 0


def test_the_plan_without_a_trace_uses_the_given_time_and_meets_a_deadline():
    prices = run_report.merged_prices()
    unknown = run_report.plan(100, [], [], prices, MACHINE, fleet_size=4)
    assert unknown["task_seconds_from"] == "" and unknown["wall_seconds"] is None and unknown["machines"] == 4
    assert unknown["slots"] == 2  # c4.large: 2 vCPUs, 3,840 MiB, a task 1 vCPU and 512 MiB
    given = run_report.plan(100, [], [], prices, MACHINE, 4, task_seconds=60, start_seconds=60, deadline_seconds=660)
    assert given["wall_seconds"] == 60 + math.ceil(100 / 8) * 60  # 13 rounds on 4 machines of 2 slots
    assert given["deadline_machines"] == 5  # 10 rounds fit in 600 s: 100 tasks need 5 machines of 2 slots
    too_soon = run_report.plan(100, [], [], prices, MACHINE, 4, task_seconds=60, deadline_seconds=90)
    assert too_soon["deadline_machines"] is None  # not even one round fits


def test_a_machine_costs_from_its_launch_once(run):
    """With its launch time known, a machine's time runs from its launch (its boot shows in the picture and the
    plan); a second run of the worker on the same machine counts from its own start, not from the launch again."""
    rows, workers = run
    workers[0]["launched_at"] = f"{T0 - 20:.3f}"  # w1's machine booted 20 s before its worker started
    again = _worker("w1", 31, 35, slots=2, launched_at=f"{T0 - 20:.3f}")
    prices = run_report.merged_prices()
    cost = run_report.cost(rows, workers + [again], prices, "us-east-1")
    on_demand = next(entry for entry in cost["machines"] if entry["market"] == "on-demand")
    assert on_demand["machines"] == 1 and on_demand["seconds"] == pytest.approx(50 + 4)
    planned = run_report.plan(5, rows, workers, prices, MACHINE, fleet_size=10, start_seconds=99)
    assert planned["start_seconds"] == pytest.approx(21)  # w1: launch to first claim (w2's launch is not known)
    assert run_report.summary(rows, workers)["wall_seconds"] == pytest.approx(60)
