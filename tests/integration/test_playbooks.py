"""The step playbooks that act from the operator's machine - bucket, iam, network, status, mount, teardown -
and the settings check, against the emulator.

Each playbook runs in a real ansible-playbook process, as in test_dataset_playbook.py: the AWS_* variables
are removed from its environment, so the emulator is reached only through `module_defaults`. Every test has
a project name (the `project` tag, the IAM path) and a bucket of its own, so teardown - which removes all
that carries the project's tag - never touches another test's resources. These tests have an emulator of
their own too: on the local target teardown also reconciles the Docker Engine with the emulator's EC2 state
(cicc.cloud.local_instances), which must not act on other tests' instances and AMIs. The playbooks run with
the static inventory only: they act on localhost, and the dynamic EC2 inventory is for the steps that
configure instances.

The least-privilege test uses a second emulator with IAM enforcement on (INITIAL_NO_AUTH_ACTION_COUNT): the
worker's inline policy that iam.yml applies is given to a user, whose keys must do the worker's job in its
bucket and prefix and be refused everywhere else.
"""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from ansible_collections.cicc.cloud.plugins.module_utils import emulator as local_emulator
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.dataset import build_dataset
from ansible_collections.cicc.cloud.tests.helpers import ansible, list_keys, play_recap, read_body, tagged

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
INPUT_SIZE = 1_000
WORKER_S3_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


# --- running playbooks ------------------------------------------------------------------------------------


def _playbook(name: str, settings: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    command = ["ansible-playbook", "-i", "inventory/hosts.yml", f"playbooks/{name}", "-e", json.dumps(settings), *args]
    return ansible(*command, env=env, aws_from_environment=False)


def _recap(result: subprocess.CompletedProcess) -> dict[str, int]:
    recap = play_recap(result.stdout)
    assert "localhost" in recap, f"no PLAY RECAP in:\n{result.stdout}\n{result.stderr}"
    return recap["localhost"]


def _ok(result: subprocess.CompletedProcess) -> dict[str, int]:
    assert result.returncode == 0, result.stdout + result.stderr
    return _recap(result)


def _flat(result: subprocess.CompletedProcess) -> str:
    """stdout + stderr with the YAML callback's line wrapping undone."""
    return " ".join((result.stdout + result.stderr).split())


def _task_result(result: subprocess.CompletedProcess, task: str) -> dict:
    """The result a task printed, from a run with ANSIBLE_CALLBACK_RESULT_FORMAT=json."""
    text = result.stdout
    start = text.index(f"TASK [{task}]")
    start = text.index("=> ", start) + len("=> ")
    return json.JSONDecoder().raw_decode(text, start)[0]


# --- reading the emulator ---------------------------------------------------------------------------------


def _clients(endpoint: str, key: str = "testing", secret: str = "testing") -> dict:
    session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret, region_name=REGION)
    return {name: session.client(name, endpoint_url=endpoint) for name in ("s3", "iam", "ec2", "sts")}


def _buckets(s3) -> set[str]:
    return {item["Name"] for item in s3.list_buckets()["Buckets"]}


def _seed_ec2(ec2, project: str) -> dict[str, list[str]]:
    """What the later steps (base instance, image, fleet) will leave tagged, made by hand until they exist."""

    def tags(kind: str, **extra: str) -> list[dict]:
        return [
            {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in {"project": project, **extra}.items()]}
        ]

    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instances = ec2.run_instances(
        ImageId=ami, MinCount=2, MaxCount=2, InstanceType="c4.large", TagSpecifications=tags("instance", role="worker")
    )["Instances"]
    image = ec2.create_image(
        InstanceId=instances[0]["InstanceId"], Name=f"{project}-image", TagSpecifications=tags("image")
    )
    # The emulator cannot tag snapshots in CreateImage; AWS can, and the image step will.
    image_snapshot = ec2.describe_images(ImageIds=[image["ImageId"]])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]
    ec2.create_tags(Resources=[image_snapshot["SnapshotId"]], Tags=[{"Key": "project", "Value": project}])
    volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1)["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume, TagSpecifications=tags("snapshot"))["SnapshotId"]
    ec2.delete_volume(VolumeId=volume)
    group = ec2.create_security_group(
        GroupName=f"{project}-workers", Description="no inbound rule", TagSpecifications=tags("security-group")
    )["GroupId"]
    key = ec2.create_key_pair(KeyName=f"{project}-key", TagSpecifications=tags("key-pair"))["KeyName"]
    return {
        "instances": sorted(i["InstanceId"] for i in instances),
        "images": [image["ImageId"]],
        "snapshots": sorted([image_snapshot["SnapshotId"], snapshot]),
        "security_groups": [group],
        "key_pairs": [key],
    }


def _cleanup(aws: dict, project: str, bucket: str) -> None:
    """Whatever a failed test left behind, removed with boto3 (not with the playbook under test)."""
    ec2, iam, s3 = aws["ec2"], aws["iam"], aws["s3"]
    left = tagged(aws, project, bucket)
    if left.get("instances"):
        ec2.terminate_instances(InstanceIds=left["instances"])
    for image in left.get("images", []):
        ec2.deregister_image(ImageId=image)
    for snapshot in left.get("snapshots", []):
        ec2.delete_snapshot(SnapshotId=snapshot)
    for group in left.get("security_groups", []):
        ec2.delete_security_group(GroupId=group)
    for key in left.get("key_pairs", []):
        ec2.delete_key_pair(KeyName=key)
    for template in left.get("launch_templates", []):
        ec2.delete_launch_template(LaunchTemplateName=template)
    if left.get("vpc_endpoints"):
        ec2.delete_vpc_endpoints(VpcEndpointIds=left["vpc_endpoints"])
    for table in left.get("route_tables", []):
        for association in ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Associations"]:
            ec2.disassociate_route_table(AssociationId=association["RouteTableAssociationId"])
        ec2.delete_route_table(RouteTableId=table)
    for gateway in left.get("internet_gateways", []):
        found = ec2.describe_internet_gateways(InternetGatewayIds=[gateway])["InternetGateways"][0]
        for attachment in found["Attachments"]:
            ec2.detach_internet_gateway(InternetGatewayId=gateway, VpcId=attachment["VpcId"])
        ec2.delete_internet_gateway(InternetGatewayId=gateway)
    for subnet in left.get("subnets", []):
        ec2.delete_subnet(SubnetId=subnet)
    for vpc in left.get("vpcs", []):
        ec2.delete_vpc(VpcId=vpc)
    for profile in left.get("instance_profiles", []):
        for role in iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]:
            iam.remove_role_from_instance_profile(InstanceProfileName=profile, RoleName=role["RoleName"])
        iam.delete_instance_profile(InstanceProfileName=profile)
    for role in left.get("roles", []):
        for attached in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
            iam.detach_role_policy(RoleName=role, PolicyArn=attached["PolicyArn"])
        for policy in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            iam.delete_role_policy(RoleName=role, PolicyName=policy)
        iam.delete_role(RoleName=role)
    if left.get("buckets"):
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="module")
def own_emulator(moto_server):
    """A moto server for this module's tests alone."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def project(own_emulator):
    """Settings of a project of its own on this module's emulator; everything it tagged is removed afterwards."""
    name = f"cit-{uuid.uuid4().hex[:10]}"
    settings = {
        "cicc_emulator_port": urlparse(own_emulator).port,
        "cicc_project": name,
        "cicc_bucket": f"{name}-work",
        "cicc_prefix": "run-1/",
        "cicc_dataset_input_size": INPUT_SIZE,
    }
    yield settings
    _cleanup(_clients(own_emulator), name, settings["cicc_bucket"])


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("cicc_target", "gcp", "cicc_target is 'gcp': set it to local"),
        ("cicc_region", "mars-1", "cicc_region is 'mars-1': set an AWS region code"),
        ("cicc_bucket", "Cicc_Bucket", "cicc_bucket is 'Cicc_Bucket': an S3 bucket name has 3-63 lowercase"),
        ("cicc_bucket", "192.168.1.1", "cicc_bucket is '192.168.1.1'"),
        (
            "cicc_prefix",
            "run-1",
            "cicc_prefix is 'run-1': leave it empty (the whole bucket) or set a key prefix ending",
        ),
        ("cicc_prefix", "/run-1/", "cicc_prefix is '/run-1/'"),
        ("cicc_fleet_size", 0, "cicc_fleet_size is '0': set a whole number of workers, 1 or more"),
        ("cicc_fleet_size", "three", "cicc_fleet_size is 'three'"),
        ("cicc_spot", "maybe", "cicc_spot is 'maybe': set true"),
        ("cicc_network_mode", "public", "cicc_network_mode is 'public': set default"),
        ("cicc_s3_mount_tool", "goofys", "cicc_s3_mount_tool is 'goofys': set s3fs"),
        ("cicc_instance_type", "", "cicc_instance_type is '': set an EC2 instance type such as c4.large"),
        ("cicc_ssh_access", True, "cicc_ssh_access is true but cicc_operator_cidr is empty: set cicc_operator_cidr"),
        ("cicc_operator_cidr", "0.0.0.0/0", "cicc_operator_cidr is '0.0.0.0/0': set your own address as a CIDR"),
        ("cicc_project", "has space", "cicc_project is 'has space'"),
        ("cicc_iam_path", "/", "cicc_iam_path is '/': set an IAM path of the project's own"),
    ],
)
def test_validate_rejects_a_wrong_setting(setting: str, value, message: str) -> None:
    result = _playbook("validate.yml", {setting: value})
    assert result.returncode != 0
    assert _recap(result)["failed"] == 1
    text = _flat(result)
    assert message in text
    assert "Fix these settings (-e NAME=VALUE, or group_vars/all next to your inventory)" in text


def test_validate_accepts_the_defaults_and_good_values() -> None:
    # The defaults, on a port no emulator answers on: the settings role's check of the types, validate.yml's own
    # check skipped, the emulator started (the one change), the check remembered; a second run finds it answering.
    port = local_emulator.free_port()
    try:
        started = _ok(_playbook("validate.yml", {"cicc_emulator_port": port}))
        assert started == {"ok": 3, "changed": 1, "unreachable": 0, "failed": 0}
        assert local_emulator.status(port)["answers"]
        assert _ok(_playbook("validate.yml", {"cicc_emulator_port": port}))["changed"] == 0
    finally:
        local_emulator.stop(port)
    good = {
        "cicc_target": "aws",
        "cicc_region": "eu-west-2",
        "cicc_prefix": "runs/2025-12-13/",
        "cicc_fleet_size": "7",
        "cicc_spot": "true",
        "cicc_network_mode": "private",
        "cicc_s3_mount_tool": "mount-s3",
        "cicc_ssh_access": True,
        "cicc_operator_cidr": "203.0.113.7/32",
        "cicc_instance_type": "t3a.micro",
    }
    assert _ok(_playbook("validate.yml", good))["failed"] == 0


def test_step_playbooks_stop_before_any_change(own_emulator, project) -> None:
    aws = _clients(own_emulator)
    """Every problem is named at once, and a step with a wrong setting creates nothing."""
    result = _playbook("bucket.yml", {**project, "cicc_target": "gcp", "cicc_fleet_size": 0})
    assert result.returncode != 0
    text = _flat(result)
    assert "cicc_target is 'gcp'" in text and "cicc_fleet_size is '0'" in text
    assert project["cicc_bucket"] not in _buckets(aws["s3"])
    result = _playbook("iam.yml", {**project, "cicc_network_mode": "public"})
    assert result.returncode != 0 and "cicc_network_mode is 'public'" in _flat(result)
    # The whole pipeline checks the settings of its later steps before its first change.
    result = _playbook("site.yml", {**project, "cicc_fleet_tasks_per_machine": "one"})
    assert result.returncode != 0 and "cicc_fleet_tasks_per_machine is 'one'" in _flat(result)
    # A bad job: every wrong field named, by the same check the boot worker makes, before anything is made.
    job = yaml.safe_load((ROOT / "jobs" / "xor.yml").read_text())["cicc_job"]
    bad = {**job, "name": "Bad Name", "cpus": 0, "env": {"AWS_SECRET_ACCESS_KEY": "x"}, "comand": ["typo"]}
    result = _playbook("site.yml", {**project, "cicc_job": bad})
    text = _flat(result)
    assert result.returncode != 0 and _recap(result)["changed"] == 0
    for field in (
        "job field name is 'Bad Name'",
        "job field cpus is 0",
        "job field env.AWS_SECRET_ACCESS_KEY",
        "comand",
    ):
        assert field in text, field
    assert not tagged(aws, project["cicc_project"], project["cicc_bucket"])


# --- bucket -> iam -> teardown ----------------------------------------------------------------------------


def test_bucket_iam_and_teardown(own_emulator, project) -> None:
    aws = _clients(own_emulator)
    s3, iam, ec2 = aws["s3"], aws["iam"], aws["ec2"]
    name, bucket, prefix = project["cicc_project"], project["cicc_bucket"], project["cicc_prefix"]
    role, profile, policy = f"{name}-xor-worker-role", f"{name}-xor-worker-profile", f"{name}-xor-worker-policy"
    builder_role, builder_profile = f"{name}-builder-role", f"{name}-builder-profile"

    # Check mode: both steps would change things, and nothing is created.
    assert _ok(_playbook("bucket.yml", project, "--check"))["changed"] >= 1
    assert _ok(_playbook("iam.yml", project, "--check"))["changed"] >= 2
    assert not tagged(aws, name, bucket)

    # bucket: private, encrypted, owner-enforced, tagged, with the data set; the TLS-only policy is built
    # and shown but not applied (the emulator would refuse every object call under it).
    assert _ok(_playbook("bucket.yml", project))["changed"] == 2
    assert s3.get_bucket_tagging(Bucket=bucket)["TagSet"] == [{"Key": "project", "Value": name}]
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"] == [
        {"ObjectOwnership": "BucketOwnerEnforced"}
    ]
    assert f"{prefix}tasklist.txt" in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    with pytest.raises(ClientError, match="NoSuchBucketPolicy"):
        s3.get_bucket_policy(Bucket=bucket)

    # Idempotent; this run prints results as JSON so that the policy it shows can be read back.
    result = _playbook("bucket.yml", project, ANSIBLE_CALLBACK_RESULT_FORMAT="json")
    assert _ok(result)["changed"] == 0
    shown = _task_result(result, "Show what the bucket holds")["msg"]
    assert shown["tls_only_policy"].startswith("built, not applied")
    assert shown["tls_only_policy_document"] == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }

    # iam: role (trusting EC2 only, no managed policy) -> one inline policy -> instance profile; no user, no key.
    users = iam.list_users()["Users"]
    assert _ok(_playbook("iam.yml", project))["changed"] == 3
    assert iam.list_users()["Users"] == users
    found = iam.get_role(RoleName=role)["Role"]
    assert found["Path"] == f"/{name}/"
    assert {t["Key"]: t["Value"] for t in found["Tags"]} == {"project": name}
    assert found["AssumeRolePolicyDocument"]["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]
    assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == [policy]
    document = iam.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
    statements = {s["Sid"]: s for s in document["Statement"]}
    assert statements["ListTheJobsPrefixes"]["Action"] == "s3:ListBucket"
    assert statements["ListTheJobsPrefixes"]["Resource"] == f"arn:aws:s3:::{bucket}"
    assert statements["ListTheJobsPrefixes"]["Condition"] == {"StringLike": {"s3:prefix": [f"{prefix}*"]}}
    assert statements["ReadTheInputs"]["Action"] == "s3:GetObject"
    assert set(statements["WorkTheQueue"]["Action"]) == WORKER_S3_ACTIONS
    assert set(statements["PublishTheOutputs"]["Action"]) == {"s3:GetObject", "s3:PutObject"}
    for sid in ("ReadTheInputs", "WorkTheQueue", "PublishTheOutputs"):
        assert statements[sid]["Resource"] == f"arn:aws:s3:::{bucket}/{prefix}*", sid
    # Each machine may terminate itself and no other (AWS checks the condition; the emulator ignores it).
    assert statements["TerminateItselfOnly"]["Action"] == "ec2:TerminateInstances"
    assert statements["TerminateItselfOnly"]["Resource"] == f"arn:aws:ec2:{REGION}:*:instance/*"
    assert statements["TerminateItselfOnly"]["Condition"] == {"StringEquals": {"aws:ARN": "${ec2:SourceInstanceARN}"}}
    assert len(statements) == 5 and all(s["Effect"] == "Allow" for s in statements.values())
    carried = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]
    assert [r["RoleName"] for r in carried["Roles"]] == [role]
    assert {t["Key"]: t["Value"] for t in carried["Tags"]} == {"project": name}
    # The base instance's identity: the same policy, plus Systems Manager for configuring it on AWS.
    assert iam.get_role(RoleName=builder_role)["Role"]["Path"] == f"/{name}/"
    assert [p["PolicyName"] for p in iam.list_attached_role_policies(RoleName=builder_role)["AttachedPolicies"]] == [
        "AmazonSSMManagedInstanceCore"
    ]
    assert iam.list_role_policies(RoleName=builder_role)["PolicyNames"] == [f"{name}-builder-policy"]
    built = iam.get_role_policy(RoleName=builder_role, PolicyName=f"{name}-builder-policy")["PolicyDocument"]
    assert {s["Sid"]: s["Resource"] for s in built["Statement"]} == {
        "ListTheBucket": f"arn:aws:s3:::{bucket}",
        "ReadWriteTheBucket": f"arn:aws:s3:::{bucket}/*",
    }
    carried = iam.get_instance_profile(InstanceProfileName=builder_profile)["InstanceProfile"]
    assert [r["RoleName"] for r in carried["Roles"]] == [builder_role]

    # Idempotent, in check mode too; a broader inline policy added by hand (the seed's) is removed.
    assert _ok(_playbook("iam.yml", project))["changed"] == 0
    assert _ok(_playbook("iam.yml", project, "--check"))["changed"] == 0
    everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_role_policy(RoleName=role, PolicyName="cicc-bucket-access", PolicyDocument=json.dumps(everything))
    assert _ok(_playbook("iam.yml", project))["changed"] == 1
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == [policy]

    # What the later steps leave (instances, AMI + snapshots, security group, key pair), and someone else's
    # instance that teardown must not touch.
    seeded = _seed_ec2(ec2, name)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    other_tags = [{"ResourceType": "instance", "Tags": [{"Key": "project", "Value": f"{name}-other"}]}]
    other = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=other_tags)["Instances"][0]
    everything_tagged = {
        **seeded,
        "roles": sorted([builder_role, role]),
        "instance_profiles": sorted([builder_profile, profile]),
        "buckets": [bucket],
    }
    assert {kind: sorted(ids) for kind, ids in tagged(aws, name, bucket).items()} == everything_tagged

    # teardown in check mode removes nothing.
    assert _ok(_playbook("teardown.yml", project, "--check"))["changed"] >= 1
    assert {kind: sorted(ids) for kind, ids in tagged(aws, name, bucket).items()} == everything_tagged

    # teardown: everything tagged goes but the bucket, which is kept unless asked for; it says so.
    result = _playbook("teardown.yml", project)
    assert _ok(result)["changed"] >= 7
    assert tagged(aws, name, bucket) == {"buckets": [bucket]}
    assert f"except the bucket {bucket} (kept: set cicc_delete_bucket=true to remove it)" in _flat(result)

    # With cicc_delete_bucket the bucket and all its objects go too; nothing tagged is left.
    result = _playbook("teardown.yml", {**project, "cicc_delete_bucket": True})
    assert _ok(result)["changed"] == 1
    assert f"Nothing tagged project={name} is left." in _flat(result)
    assert tagged(aws, name, bucket) == {}
    state = ec2.describe_instances(InstanceIds=[other["InstanceId"]])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "running"
    ec2.terminate_instances(InstanceIds=[other["InstanceId"]])

    # Again: nothing to do.
    assert _ok(_playbook("teardown.yml", {**project, "cicc_delete_bucket": True}))["changed"] == 0


def test_private_network_and_its_teardown(own_emulator, project) -> None:
    """network.yml in private mode: check mode, apply, idempotent re-run; teardown removes every piece of it."""
    aws = _clients(own_emulator)
    ec2 = aws["ec2"]
    settings = {**project, "cicc_network_mode": "private"}
    name, bucket = settings["cicc_project"], settings["cicc_bucket"]

    assert _ok(_playbook("network.yml", settings, "--check"))["changed"] >= 1
    assert not tagged(aws, name, bucket)

    assert _ok(_playbook("network.yml", settings))["changed"] >= 6
    made = tagged(aws, name, bucket)
    assert {kind: len(ids) for kind, ids in made.items()} == {
        "vpcs": 1,
        "subnets": 2,
        "internet_gateways": 1,
        "route_tables": 2,
        "vpc_endpoints": 1,
    }
    subnets = {
        {t["Key"]: t["Value"] for t in n["Tags"]}["tier"]: n
        for n in ec2.describe_subnets(SubnetIds=made["subnets"])["Subnets"]
    }
    assert subnets["public"]["MapPublicIpOnLaunch"] and not subnets["private"]["MapPublicIpOnLaunch"]
    # The fleet's subnet has no way out but the S3 endpoint.
    private_table = ec2.describe_route_tables(
        Filters=[{"Name": "association.subnet-id", "Values": [subnets["private"]["SubnetId"]]}]
    )["RouteTables"][0]
    assert not [r for r in private_table["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
    endpoint = ec2.describe_vpc_endpoints(VpcEndpointIds=made["vpc_endpoints"])["VpcEndpoints"][0]
    assert endpoint["ServiceName"] == f"com.amazonaws.{REGION}.s3"
    assert private_table["RouteTableId"] in endpoint["RouteTableIds"]

    assert _ok(_playbook("network.yml", settings))["changed"] == 0

    # The fleet's spot launch template and security group, as fleet.yml leaves them, go with the network.
    tag = [{"Key": "project", "Value": name}]
    ec2.create_launch_template(
        LaunchTemplateName=f"{name}-fleet-spot",
        LaunchTemplateData={"InstanceMarketOptions": {"MarketType": "spot"}},
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag}],
    )
    ec2.create_security_group(
        GroupName=f"{name}-workers",
        Description="no inbound rule",
        VpcId=made["vpcs"][0],
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tag}],
    )
    assert set(tagged(aws, name, bucket)) == set(made) | {"launch_templates", "security_groups"}

    # One changed task per kind: template, security group, endpoint, route tables, gateway, subnets, VPC.
    result = _playbook("teardown.yml", settings)
    assert _ok(result)["changed"] == 7
    assert f"Nothing tagged project={name} is left." in _flat(result)
    assert tagged(aws, name, bucket) == {}
    assert _ok(_playbook("teardown.yml", settings))["changed"] == 0


def test_dataset_is_exact_idempotent_and_never_overwritten(own_emulator, project) -> None:
    """The data set byte for byte; re-runs change nothing, also once the queue has moved; no blind overwrite."""
    s3 = _clients(own_emulator)["s3"]
    bucket, prefix = project["cicc_bucket"], project["cicc_prefix"]
    # The XOR job's data set (the default job), but for the input size the test sets.
    shape = yaml.safe_load((ROOT / "jobs" / "xor.yml").read_text())["cicc_job"]["dataset"]
    wanted = build_dataset(**{**shape, "input_size": INPUT_SIZE})
    wanted = {prefix + name: body for name, body in wanted.items()}

    assert _ok(_playbook("dataset.yml", project))["changed"] == 2
    assert set(list_keys(s3, bucket)) == set(wanted)
    for key, body in wanted.items():
        assert read_body(s3, bucket, key) == body, key
    assert _ok(_playbook("dataset.yml", project))["changed"] == 0

    # Once workers have moved a task, the lists are the queue's state: a re-run leaves them and fails on nothing.
    tasklist, completed = prefix + "tasklist.txt", prefix + "completed.txt"
    pending = read_body(s3, bucket, tasklist).decode().split()
    queue_state = {
        tasklist: "".join(f"{name}\n" for name in pending[1:]).encode(),
        completed: read_body(s3, bucket, completed) + f"{pending[0]}\n".encode(),
    }
    for key, body in queue_state.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    assert _ok(_playbook("dataset.yml", project))["changed"] == 0
    for key, body in queue_state.items():
        assert read_body(s3, bucket, key) == body, key

    # An object changed by hand (same size, other bytes) is never overwritten blindly.
    altered_key, altered = prefix + "in5.dat", bytes(INPUT_SIZE)
    s3.put_object(Bucket=bucket, Key=altered_key, Body=altered)
    result = _playbook("dataset.yml", project)
    assert result.returncode != 0 and _recap(result)["failed"] == 1
    message = _flat(result)
    assert f"with other content: {altered_key}." in message
    assert "set overwrite=true" in message and "use another prefix" in message
    assert read_body(s3, bucket, altered_key) == altered
    assert set(list_keys(s3, bucket)) == set(wanted)

    # state=absent, ad hoc, removes exactly the data set: a key the pipeline wrote later stays.
    extra_key = prefix + "out5.dat"
    s3.put_object(Bucket=bucket, Key=extra_key, Body=b"produced by a worker")
    adhoc = [
        "ansible",
        "localhost",
        "-m",
        "cicc.cloud.dataset",
        "-a",
        f"bucket={bucket} prefix='{prefix}' state=absent endpoint_url={own_emulator} "
        "access_key=testing secret_key=testing region=us-east-1",
    ]
    for args, outcome, left in (
        (["--check"], "CHANGED", set(wanted) | {extra_key}),
        ([], "CHANGED", {extra_key}),
        ([], "SUCCESS", {extra_key}),
    ):
        result = ansible(*adhoc, *args, aws_from_environment=False)
        assert result.returncode == 0 and f"| {outcome}" in result.stdout, result.stdout + result.stderr
        assert set(list_keys(s3, bucket)) == left


def test_teardown_keeps_a_bucket_the_project_did_not_make(own_emulator, project) -> None:
    """cicc_delete_bucket never deletes a bucket that does not carry the project's tag."""
    bucket = project["cicc_bucket"]
    s3 = _clients(own_emulator)["s3"]
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="precious.dat", Body=b"not ours to delete")
    result = _playbook("teardown.yml", {**project, "cicc_delete_bucket": True})
    assert _ok(result)["changed"] == 0
    assert f"{bucket} is not tagged project={project['cicc_project']}, so it was not touched" in _flat(result)
    assert s3.get_object(Bucket=bucket, Key="precious.dat")["Body"].read() == b"not ours to delete"


# --- status and mount ------------------------------------------------------------------------------------


def test_job_step_writes_the_job_and_queues_its_inputs(own_emulator, project) -> None:
    """job.yml: check mode writes nothing, then the normalised job file, idempotent; a job whose tasks are its
    inputs gets the matching ones queued once; teardown_job.yml removes the job file and leaves the rest."""
    s3 = _clients(own_emulator)["s3"]
    bucket = project["cicc_bucket"]
    _ok(_playbook("bucket.yml", project))
    summary = yaml.safe_load((ROOT / "jobs" / "summary.yml").read_text())["cicc_job"]
    settings = {**project, "cicc_prefix": "summary/", "cicc_job": {**summary, "inputs": {"prefix": "run-1/"}}}
    before = set(list_keys(s3, bucket))

    assert _ok(_playbook("job.yml", settings, "--check"))["changed"] == 1
    assert set(list_keys(s3, bucket)) == before
    result = _playbook("job.yml", settings, ANSIBLE_CALLBACK_RESULT_FORMAT="json")
    assert _ok(result)["changed"] == 1
    written = json.loads(read_body(s3, bucket, "summary/job.json"))
    assert written["bucket"] == bucket and written["inputs"]["prefix"] == "run-1/"
    assert written["outputs"]["prefix"] == "summary/results/" and written["image"]["source"] == "archive"
    shown = _task_result(result, "Show the job")["msg"]
    assert shown.startswith(f"job summary: s3://{bucket}/summary/job.json, image cicc-summary:latest (archive)")
    assert shown.endswith(", 10 input(s) queued")
    names = [f"in{i}.dat" for i in range(10)]  # the data set's inputs match in*.dat; kernel.dat does not
    assert read_body(s3, bucket, "summary/tasklist.txt").decode().split() == names
    assert _ok(_playbook("job.yml", settings))["changed"] == 0

    # A new input is queued once; a task already done is not queued again.
    s3.put_object(Bucket=bucket, Key="run-1/in10.dat", Body=b"new")
    s3.put_object(Bucket=bucket, Key="summary/completed.txt", Body=b"in10.dat\n")
    s3.put_object(Bucket=bucket, Key="run-1/in11.dat", Body=b"newer")
    assert _ok(_playbook("job.yml", settings))["changed"] == 1
    assert read_body(s3, bucket, "summary/tasklist.txt").decode().split() == names + ["in11.dat"]

    assert _ok(_playbook("teardown_job.yml", settings))["changed"] >= 1
    assert "summary/job.json" not in set(list_keys(s3, bucket)) and "summary/tasklist.txt" in set(list_keys(s3, bucket))
    assert _ok(_playbook("teardown_job.yml", settings))["changed"] == 0


def test_status_shows_the_queue_and_the_fleet(own_emulator, project) -> None:
    """Read-only, for a person and as JSON: the queue's counts and claims, the machines not terminated."""
    aws = _clients(own_emulator)
    name, bucket, prefix = project["cicc_project"], project["cicc_bucket"], project["cicc_prefix"]
    _ok(_playbook("bucket.yml", project))
    task_queue.claim(aws["s3"], task_queue.Queue(bucket, prefix), "in3.dat", owner="operator")
    ami = aws["ec2"].describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    tags = [{"Key": "project", "Value": name}, {"Key": "role", "Value": "worker"}]
    machine = aws["ec2"].run_instances(
        ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": tags}]
    )["Instances"][0]["InstanceId"]

    result = _playbook("status.yml", project)
    assert _ok(result)["changed"] == 0
    text = _flat(result)
    assert (
        f"queue s3://{bucket}/{prefix}: 7 pending, 1 claimed (operator), 3 completed, 0 failed, 0 rejected lines"
        in text
    )
    assert f"machines of project {name} not terminated: 1 - {machine} (worker, running)" in text

    result = _playbook("status.yml", {**project, "cicc_status_json": True}, ANSIBLE_CALLBACK_RESULT_FORMAT="json")
    _ok(result)
    shown = json.loads(_task_result(result, "Show the queue and the fleet")["msg"])
    assert (shown["queue"]["pending"], shown["queue"]["claimed"], shown["queue"]["completed"]) == (7, 1, 3)
    assert shown["queue"]["claims"][0]["owner"] == "operator"
    assert shown["machines"] == [{"instance_id": machine, "role": "worker", "job": "", "state": "running"}]


def test_mount_shows_the_bucket_as_files_and_unmounts(own_emulator, project, tmp_path) -> None:
    """s3fs on this machine against the emulator: check mode, mount, idempotent, the files readable, unmount."""
    mount = tmp_path / "s3"
    settings = {**project, "cicc_mount_path": str(mount), "cicc_key_dir": str(tmp_path / "keys")}
    passwd = tmp_path / "keys" / f"passwd-s3fs-{project['cicc_bucket']}"
    _ok(_playbook("bucket.yml", project))
    try:
        assert _ok(_playbook("mount.yml", settings, "--check"))["changed"] >= 1
        assert not passwd.exists()
        assert _ok(_playbook("mount.yml", settings))["changed"] >= 1
        assert oct(passwd.stat().st_mode & 0o777) == "0o600"
        assert subprocess.run(["mountpoint", "-q", str(mount)], check=False).returncode == 0
        folder = mount / project["cicc_prefix"].rstrip("/")
        assert (folder / "tasklist.txt").read_text().split() == [f"in{i}.dat" for i in range(3, 10)]
        assert (folder / "in3.dat").stat().st_size == INPUT_SIZE
        assert _ok(_playbook("mount.yml", settings))["changed"] == 0

        unmount = {**settings, "cicc_mount_state": "absent"}
        assert _ok(_playbook("mount.yml", unmount))["changed"] >= 1
        assert subprocess.run(["mountpoint", "-q", str(mount)], check=False).returncode != 0
        assert not passwd.exists()
        assert _ok(_playbook("mount.yml", unmount))["changed"] == 0
    finally:
        subprocess.run(["fusermount", "-u", str(mount)], check=False, capture_output=True)


# --- least privilege, with IAM enforced -------------------------------------------------------------------


@pytest.fixture
def enforcing_emulator(moto_server):
    """A moto server of its own that checks every request against IAM after the first three (the admin's setup).

    Yields the endpoint and an administrator's access keys; the server is stopped afterwards, with all it held.
    """
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="3") as endpoint:
        iam = _clients(endpoint)["iam"]
        admin = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="admin", PolicyDocument=json.dumps(admin))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        # From here on, every request is checked: unknown keys are refused.
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            _clients(endpoint)["s3"].list_buckets()
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]


def _denied(call, *args, **kwargs) -> str:
    with pytest.raises(ClientError) as refused:
        call(*args, **kwargs)
    code = refused.value.response["Error"]["Code"]
    assert code == "AccessDenied", refused.value
    return code


def test_worker_policy_allows_the_workers_job_and_nothing_else(enforcing_emulator) -> None:
    endpoint, admin_key, admin_secret = enforcing_emulator
    admin = _clients(endpoint, admin_key, admin_secret)
    name = f"cit-{uuid.uuid4().hex[:10]}"
    bucket, prefix = f"{name}-work", "run-1/"
    settings = {
        "cicc_project": name,
        "cicc_bucket": bucket,
        "cicc_prefix": prefix,
        "cicc_dataset_input_size": INPUT_SIZE,
        # This test's emulator, so the playbooks find it answering and start none of their own.
        "cicc_emulator_port": urlparse(endpoint).port,
        # The administrator's keys instead of the emulator's usual ones: the playbooks run under enforcement.
        "cicc_aws_defaults": {
            "region": REGION,
            "endpoint_url": endpoint,
            "access_key": admin_key,
            "secret_key": admin_secret,
        },
    }
    assert _ok(_playbook("bucket.yml", settings))["changed"] == 2
    assert _ok(_playbook("iam.yml", settings))["changed"] == 3

    # A user holding exactly the inline policy the iam step applied to the worker role.
    document = admin["iam"].get_role_policy(RoleName=f"{name}-xor-worker-role", PolicyName=f"{name}-xor-worker-policy")
    admin["iam"].create_user(UserName="worker")
    admin["iam"].put_user_policy(
        UserName="worker", PolicyName="worker", PolicyDocument=json.dumps(document["PolicyDocument"])
    )
    key = admin["iam"].create_access_key(UserName="worker")["AccessKey"]
    worker = _clients(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    s3 = worker["s3"]

    # Another bucket, with an object where the worker's prefix would be, and an instance of no project.
    admin["s3"].create_bucket(Bucket=f"{name}-other")
    admin["s3"].put_object(Bucket=f"{name}-other", Key=f"{prefix}in3.dat", Body=b"someone else's")
    ami = admin["ec2"].describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    stranger = admin["ec2"].run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    # The worker's job: claim (conditional put), read, renew (If-Match), list, mark finished (If-Match), take
    # the compaction's turn and give it back (conditional delete), tidy up (DeleteObjects), upload its log.
    lock = f"{prefix}locks/in3.dat"
    claimed = s3.put_object(Bucket=bucket, Key=lock, Body=b'{"owner": "w1"}', IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=bucket, Key=lock, Body=b'{"owner": "w2"}', IfNoneMatch="*")
    assert s3.head_object(Bucket=bucket, Key=lock)["ETag"] == claimed["ETag"]
    renewed = s3.put_object(Bucket=bucket, Key=lock, Body=b'{"owner": "w1", "renewed": 1}', IfMatch=claimed["ETag"])
    assert len(s3.get_object(Bucket=bucket, Key=f"{prefix}in3.dat")["Body"].read()) == INPUT_SIZE
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}kernel.dat")["Body"].read()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}locks/")["Contents"]
    assert [item["Key"] for item in listed] == [lock]
    assert f"{prefix}tasklist.txt" in {
        item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    }
    s3.put_object(Bucket=bucket, Key=f"{prefix}out3.dat", Body=b"result")
    s3.put_object(Bucket=bucket, Key=lock, Body=b"completed\n", IfMatch=renewed["ETag"])  # the finished mark
    turn = s3.put_object(Bucket=bucket, Key=f"{prefix}compaction.json", Body=b"{}", IfNoneMatch="*")["ETag"]
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": lock}], "Quiet": True})
    s3.delete_object(Bucket=bucket, Key=f"{prefix}compaction.json", IfMatch=turn)
    s3.upload_fileobj(io.BytesIO(b"worker log\n"), bucket, f"{prefix}logs/i-0123456789abcdef0/log.txt")

    # Outside its prefix, in another bucket, on the bucket itself, in IAM and in EC2 beyond terminating a
    # project worker: refused.
    _denied(s3.put_object, Bucket=bucket, Key="in3.dat", Body=b"outside the prefix")
    _denied(s3.get_object, Bucket=f"{name}-other", Key=f"{prefix}in3.dat")
    _denied(s3.put_object, Bucket=f"{name}-other", Key=f"{prefix}out3.dat", Body=b"x")
    _denied(s3.delete_object, Bucket=f"{name}-other", Key=f"{prefix}in3.dat")
    _denied(s3.list_objects_v2, Bucket=f"{name}-other", Prefix=prefix)
    _denied(s3.list_buckets)
    _denied(s3.create_bucket, Bucket=f"{name}-new")
    _denied(s3.put_bucket_policy, Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": []}))
    _denied(s3.delete_bucket, Bucket=bucket)
    _denied(worker["iam"].list_roles)
    _denied(worker["iam"].create_access_key, UserName="worker")
    _denied(
        worker["iam"].put_user_policy,
        UserName="worker",
        PolicyName="more",
        PolicyDocument=json.dumps(document["PolicyDocument"]),
    )
    _denied(worker["ec2"].describe_instances)
    _denied(worker["ec2"].run_instances, ImageId=ami, MinCount=1, MaxCount=1)
    _denied(worker["ec2"].terminate_instances, InstanceIds=[stranger])
    assert admin["s3"].get_object(Bucket=f"{name}-other", Key=f"{prefix}in3.dat")["Body"].read() == b"someone else's"

    # A second job in the same bucket, under another prefix: each job's machines are refused the other's keys.
    job = yaml.safe_load((ROOT / "jobs" / "xor.yml").read_text())["cicc_job"]
    other = {**settings, "cicc_prefix": "run-2/", "cicc_job": {**job, "name": "other", "dataset": None}}
    assert _ok(_playbook("iam.yml", other))["changed"] == 3
    document = admin["iam"].get_role_policy(
        RoleName=f"{name}-other-worker-role", PolicyName=f"{name}-other-worker-policy"
    )
    admin["iam"].create_user(UserName="other-worker")
    admin["iam"].put_user_policy(
        UserName="other-worker", PolicyName="worker", PolicyDocument=json.dumps(document["PolicyDocument"])
    )
    key = admin["iam"].create_access_key(UserName="other-worker")["AccessKey"]
    other_s3 = _clients(endpoint, key["AccessKeyId"], key["SecretAccessKey"])["s3"]
    admin["s3"].put_object(Bucket=bucket, Key="run-2/in3.dat", Body=b"job two's input")
    assert other_s3.get_object(Bucket=bucket, Key="run-2/in3.dat")["Body"].read() == b"job two's input"
    other_s3.put_object(Bucket=bucket, Key="run-2/locks/in3.dat", Body=b"{}", IfNoneMatch="*")
    _denied(other_s3.get_object, Bucket=bucket, Key=f"{prefix}in3.dat")
    _denied(other_s3.put_object, Bucket=bucket, Key=f"{prefix}locks/in4.dat", Body=b"{}")
    _denied(s3.get_object, Bucket=bucket, Key="run-2/in3.dat")
    _denied(s3.delete_object, Bucket=bucket, Key="run-2/locks/in3.dat")
