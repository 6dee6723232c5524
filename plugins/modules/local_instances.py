#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: local_instances
version_added: 0.1.0
short_description: Back the AWS emulator's EC2 instances with systemd containers on the local Docker Engine
description:
  - On the local cloud, every EC2 instance the playbooks launch against the AWS emulator is backed by a container named
    after its instance id, booting systemd from the image that stands for its AMI. Playbooks launch, image and
    terminate instances with M(amazon.aws.ec2_instance) and M(amazon.aws.ec2_ami) as on AWS, then run this module
    to bring the Docker Engine in line with the emulator's EC2 state. Do not use it against AWS.
  - An instance that is C(pending) or C(running) gets a running container, created from C(cicc-ami:<ami-id>) when
    that image exists, else from O(base_image) (which stands for the looked-up Ubuntu AMI and any other AMI).
  - An instance that is C(stopping), C(stopped), C(shutting-down) or C(terminated) gets its container stopped. The
    container is kept so that its logs can still be read, unless O(remove_terminated=true) and the instance is
    C(terminated); the container of an instance the emulator no longer knows is removed.
  - Each AMI owned by the account that was made from an instance (its C(cicc:source-instance) tag, else the
    C(SourceInstanceId) EC2 reports) gets its image C(cicc-ami:<ami-id>) by C(docker commit) of that instance's
    container, before any instance is handled, so a fleet launched from it boots it. Cleaning the machine first
    (ssh host keys, cloud-init state, machine-id) is up to the playbook, before it creates the AMI, as on AWS. The
    image of an AMI that is deregistered is removed once no container uses it.
  - A container that stopped by itself while the emulator still has its instance running is a machine that powered
    off (the boot worker ends with C(systemctl poweroff)); the instance gets what EC2 does on an OS-initiated
    shutdown, by its C(instanceInitiatedShutdownBehavior) - C(terminate) terminates it, C(stop) stops it. A stopped
    instance started again through the API boots its container again. A container stopped by hand with C(docker
    stop), or by a restart of the engine, is taken for a power-off too.
  - Each container runs with host networking, C(SYS_ADMIN) (not C(--privileged)), C(/dev/fuse), the cgroup tree
    read-only, the Docker socket, O(work_dir) at the same path as on the host (the worker's sibling containers are
    mounted by the host's engine) and C(<state_dir>/<instance-id>/identity.json) (instance id, AMI id, region) read-only
    at C(/etc/cicc/identity.json). It stops with C(SIGRTMIN+3), which makes systemd halt cleanly.
  - Containers and images are labelled with the EC2 endpoint they belong to; the module only touches those of the
    endpoint it talks to, so emulators on other ports can share the engine.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  base_image:
    description:
      - Local image for AMIs that have no committed image, in particular the looked-up Ubuntu AMI.
      - It must exist on the engine (C(scripts/base-image.sh) builds it); no image is ever pulled.
    default: cicc-base:bookworm
    type: str
  filters:
    description:
      - EC2 filters (as for M(amazon.aws.ec2_instance_info)) that narrow the instances handled, for example
        a filter on the project's tag. Containers of instances the emulator knows but the filters leave out are not
        touched.
    default: {}
    type: dict
  state_dir:
    description:
      - Directory on the Docker host that holds each instance's C(identity.json) and bookkeeping, one subdirectory per
        instance id.
    default: /var/lib/cicc/instances
    type: path
  work_dir:
    description:
      - Work directory of the instances' boot workers, mounted at the same path inside every container. It is
        created when missing.
    default: /var/lib/cicc/work
    type: path
  remove_terminated:
    description:
      - Remove the containers of terminated instances with their state and work directories, as teardown does.
        When V(false) they are kept, stopped, for their logs (C(docker logs <instance id>)).
    default: false
    type: bool
  wait:
    description:
      - Wait until systemd has booted (C(systemctl is-system-running) answers C(running) or C(degraded)) in every
        container this run created or started.
    default: true
    type: bool
  wait_timeout:
    description:
      - How many seconds to wait for each container to boot when O(wait=true).
    default: 120
    type: int
extends_documentation_fragment:
  - cicc.cloud.attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    details:
      - In check mode nothing is created, started, stopped, committed, removed or terminated, and nothing is waited
        for; RV(local_cloud) says what would be done.
requirements:
  - docker (the Docker SDK for Python) >= 5.0.0, reaching the engine through C(DOCKER_HOST) or C(/var/run/docker.sock)
notes:
  - The containers run on the Docker Engine of the host the module runs on (normally C(localhost)).
  - Reach the instances with the C(community.docker.docker) connection, the instance id being the container's name
    (C(ansible.builtin.add_host), as the playbooks do, or the inventory C(inventory/aws_ec2.yml)).
seealso:
  - module: amazon.aws.ec2_instance
  - module: amazon.aws.ec2_ami
"""

EXAMPLES = r"""
- name: Launch the base instance on the emulator
  amazon.aws.ec2_instance:
    image_id: "{{ ubuntu_ami }}"
    instance_type: c4.large
    tags:
      project: cicc
      role: base
    endpoint_url: http://127.0.0.1:5000

- name: Back it with a container booting systemd
  cicc.cloud.local_instances:
    filters:
      "tag:project": cicc
    endpoint_url: http://127.0.0.1:5000
  when: cicc_target == 'local'

- name: Create the AMI, tagged with the instance it is made from
  amazon.aws.ec2_ami:
    instance_id: "{{ base_instance_id }}"
    name: cicc-worker
    tags:
      project: cicc
      "cicc:source-instance": "{{ base_instance_id }}"
    wait: true

- name: Commit the instance's container into the AMI's image
  cicc.cloud.local_instances:
    filters:
      "tag:project": cicc
  when: cicc_target == 'local'

- name: See what the engine would do, without doing it
  cicc.cloud.local_instances:
  check_mode: true
  register: plan
"""

RETURN = r"""
local_cloud:
  description: What the engine holds for the emulator's instances and AMIs (would hold, in check mode).
  returned: always
  type: dict
  contains:
    instances:
      description:
        - The instances the filters select, then the containers of instances the emulator no longer knows.
      type: list
      elements: dict
      returned: always
      contains:
        instance_id:
          description: The instance id, also the container's name.
          type: str
          returned: always
          sample: i-0b22a22eec53b9321
        state:
          description: The instance's state in the emulator after this run, C(unknown) when it no longer knows it.
          type: str
          returned: always
          sample: running
        container:
          description: The container's state after this run.
          type: str
          returned: always
          sample: running
        image:
          description: The image of the container (that would be created), V(null) when there is none.
          type: str
          returned: always
          sample: cicc-ami:ami-0a8b3c2d1e4f56789
        action:
          description:
            - What this run did - V(none), V(created), V(started) or V(stopped) (the container), V(removed) (the
              container of a terminated instance with O(remove_terminated=true), or of an instance the emulator no
              longer knows), V(terminated) or V(stopped-instance) (the
              instance, after its machine powered off).
          type: str
          returned: always
          sample: created
        system_state:
          description: What C(systemctl is-system-running) answered once the container had booted.
          type: str
          returned: when O(wait=true) and the container was created or started
          sample: running
    images:
      description: The account's AMIs made from an instance, and the images removed with their AMI.
      type: list
      elements: dict
      returned: always
      contains:
        ami_id:
          description: The AMI id.
          type: str
          returned: always
          sample: ami-0a8b3c2d1e4f56789
        source_instance:
          description: The instance the AMI was made from.
          type: str
          returned: always
          sample: i-0b22a22eec53b9321
        image:
          description: The local image standing for the AMI, V(null) when it cannot be made.
          type: str
          returned: always
          sample: cicc-ami:ami-0a8b3c2d1e4f56789
        committed:
          description: Whether this run committed the image.
          type: bool
          returned: always
          sample: true
        removed:
          description: Whether this run removed the image, its AMI being deregistered.
          type: bool
          returned: always
          sample: false
        reason:
          description: Why the image cannot be made (the container of the source instance is gone).
          type: str
          returned: when RV(local_cloud.images[].image) is V(null)
          sample: AMI ami-0a8b3c2d1e4f56789 was made from instance i-0b22a22eec53b9321, whose container is gone
"""

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

import traceback

try:
    import docker

    HAS_DOCKER = True
    DOCKER_IMPORT_ERROR = None
except ImportError:
    HAS_DOCKER = False
    DOCKER_IMPORT_ERROR = traceback.format_exc()

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils.local_cloud import LocalCloudError
from ansible_collections.cicc.cloud.plugins.module_utils.local_cloud import reconcile
from ansible_collections.cicc.cloud.plugins.module_utils.local_cloud import wait_for_boot


def docker_client(module):
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, OSError) as e:
        # OSError covers requests' connection errors, raised before the SDK wraps anything.
        module.fail_json(msg=f"Couldn't reach the Docker Engine (DOCKER_HOST or /var/run/docker.sock): {e}")
    return client


def check_endpoint(module, ec2):
    endpoint = ec2.meta.endpoint_url
    if ".amazonaws.com" in endpoint:
        module.fail_json(
            msg=(
                f"local_instances backs the AWS emulator's instances with containers, but the EC2 endpoint is AWS "
                f"({endpoint}); set endpoint_url (or AWS_URL) to the emulator's address"
            )
        )


def wait_for_new(module, client, result):
    for instance in result["instances"]:
        if instance["action"] not in ("created", "started"):
            continue
        try:
            booted = wait_for_boot(client, instance["instance_id"], module.params["wait_timeout"])
        except LocalCloudError as e:
            module.fail_json(msg=str(e), changed=True, local_cloud=result)
        instance["system_state"] = booted["system_state"]


def main():
    argument_spec = dict(
        base_image=dict(type="str", default="cicc-base:bookworm"),
        filters=dict(type="dict", default={}),
        state_dir=dict(type="path", default="/var/lib/cicc/instances"),
        work_dir=dict(type="path", default="/var/lib/cicc/work"),
        remove_terminated=dict(type="bool", default=False),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=120),
    )

    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)
    if not HAS_DOCKER:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    params = module.params
    if params["wait_timeout"] < 1:
        module.fail_json(msg=f"wait_timeout must be at least 1 second, not {params['wait_timeout']}")

    ec2 = module.client("ec2")
    check_endpoint(module, ec2)
    client = docker_client(module)

    try:
        result = reconcile(
            ec2,
            client,
            base_image=params["base_image"],
            filters=params["filters"],
            state_dir=params["state_dir"],
            work_dir=params["work_dir"],
            check_mode=module.check_mode,
            remove_terminated=params["remove_terminated"],
        )
    except LocalCloudError as e:
        module.fail_json(msg=str(e))
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg="Couldn't reconcile the emulator's EC2 instances with the Docker Engine")

    if params["wait"] and not module.check_mode:
        wait_for_new(module, client, result)
    changed = result.pop("changed")
    module.exit_json(changed=changed, local_cloud=result)


if __name__ == "__main__":
    main()
