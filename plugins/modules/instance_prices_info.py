#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: instance_prices_info
version_added: 0.5.0
short_description: Read what AWS charges for the instance types of a run, on demand and on spot
description:
  - Reads the on-demand price of each of O(instance_types) in the region from the AWS Price List API (Linux, shared
    tenancy) and the spot price each paid over the run, from the EC2 spot price history of the region's zones (or
    O(zones)) between O(since) and O(until), averaged over that time and the zones.
  - Returns them in the shape M(cicc.cloud.run_report) and M(cicc.cloud.run_plan) take as O(cicc.cloud.run_report#module:prices),
    dated and with their source, so that a report on AWS says what AWS charged rather than the collection's table.
  - A price AWS will not give (no access to C(pricing:GetProducts) or C(ec2:DescribeSpotPriceHistory), or a type
    it does not price in the region) is left out with a warning; the report then uses the table's price.
  - Read-only.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  instance_types:
    description:
      - The instance types to price.
    type: list
    elements: str
    required: true
  zones:
    description:
      - The availability zones the machines ran in; all of the region's when empty.
    type: list
    elements: str
    default: []
  since:
    description:
      - Start of the run, in seconds since the epoch; O(until) when 0.
    type: float
    default: 0
  until:
    description:
      - End of the run, in seconds since the epoch; now when 0.
    type: float
    default: 0
  spot:
    description:
      - Whether to read the spot price history too.
    type: bool
    default: true
extends_documentation_fragment:
  - cicc.cloud.attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: cicc.cloud.run_report
"""

EXAMPLES = r"""
- name: Read what AWS charged for the run's machines
  cicc.cloud.instance_prices_info:
    instance_types: [c4.large]
    since: "{{ run_started }}"
  register: aws_prices

- name: Report the run at those prices
  cicc.cloud.run_report:
    bucket: my-bucket
    dest: ./report
    prices: "{{ aws_prices.prices }}"
"""

RETURN = r"""
prices:
  description:
    - The prices read, as O(cicc.cloud.run_report#module:prices) takes them - C(instances) by region, instance type
      and market (USD an hour), with C(date) (when they were read, UTC) and C(source).
  returned: always
  type: dict
  sample:
    date: "2026-12-02T14:00:00Z"
    source: "AWS Price List API (on-demand), EC2 spot price history (us-east-1a, us-east-1b)"
    instances: {"us-east-1": {"c4.large": {"on-demand": 0.1, "spot": 0.0312}}}
unpriced:
  description: The instance types and markets AWS gave no price for (the table's price stands for them).
  returned: always
  type: list
  elements: str
  sample: ["c4.large (spot)"]
"""

import time

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import run_report


def _on_demand(pricing, region, instance_type):
    filters = run_report.price_list_filters(region, instance_type)
    products = []
    for page in pricing.get_paginator("get_products").paginate(ServiceCode="AmazonEC2", Filters=filters):
        products += page.get("PriceList", [])
    return run_report.on_demand_price(products)


def _spot(ec2, instance_type, zones, since, until):
    query = dict(
        InstanceTypes=[instance_type],
        ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
        StartTime=since,
        EndTime=until,
    )
    if zones:
        query["Filters"] = [{"Name": "availability-zone", "Values": zones}]
    history = []
    for page in ec2.get_paginator("describe_spot_price_history").paginate(**query):
        history += page.get("SpotPriceHistory", [])
    zones_seen = sorted({point.get("AvailabilityZone", "") for point in history})
    return run_report.spot_price(history, since, until), zones_seen


def main():
    argument_spec = dict(
        instance_types=dict(type="list", elements="str", required=True),
        zones=dict(type="list", elements="str", default=[]),
        since=dict(type="float", default=0),
        until=dict(type="float", default=0),
        spot=dict(type="bool", default=True),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)
    params = module.params
    region = module.region or "us-east-1"
    until = params["until"] or time.time()
    since = min(params["since"] or until, until)
    pricing, ec2 = module.client("pricing", region=run_report.PRICE_LIST_REGION), module.client("ec2")
    table, unpriced, zones_seen = {}, [], set()
    for instance_type in dict.fromkeys(params["instance_types"]):
        markets = {}
        for market in ("on-demand", "spot") if params["spot"] else ("on-demand",):
            try:
                if market == "spot":
                    usd, zones = _spot(ec2, instance_type, params["zones"], since, until)
                else:
                    usd, zones = _on_demand(pricing, region, instance_type), ()
            except (BotoCoreError, ClientError) as error:
                module.warn(f"AWS gave no {market} price for {instance_type} in {region}: {error}")
                usd, zones = None, ()
            zones_seen.update(zones)
            if usd is None:
                unpriced.append(f"{instance_type} ({market})")
            else:
                markets[market] = usd
        if markets:
            table[instance_type] = markets
    source = "AWS Price List API (on-demand)"
    if params["spot"]:
        source += f", EC2 spot price history ({', '.join(sorted(zones_seen)) or 'no zone'})"
    prices = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "instances": {region: table} if table else {},
    }
    module.exit_json(changed=False, prices=prices, unpriced=unpriced)


if __name__ == "__main__":
    main()
