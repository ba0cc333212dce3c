"""Print one secret from the cloud's secret manager, for `ray start` on cluster-launcher nodes:

    export OPENAI_API_KEY="$(python ~/neuronsweep/cluster/fetch_secret.py aws neuronsweep/openai-api-key us-west-2)"
    export OPENAI_API_KEY="$(python ~/neuronsweep/cluster/fetch_secret.py gcp neuronsweep-openai-api-key)"

Ray's worker processes inherit the environment of `ray start`, so the key reaches the API actors without being
written to a file, a job's runtime env (shown on the Ray dashboard) or a log. The node's own identity (AWS
instance profile, GCP service account) must be allowed to read the secret. Standard library plus boto3 only.
"""
from __future__ import annotations

import base64
import json
import sys
import urllib.request

GCP_METADATA = "http://metadata.google.internal/computeMetadata/v1"


def _get_json(url: str, headers: dict[str, str]) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.load(response)


def aws_secret(name: str, region: str) -> str:
    import boto3  # installed on every node by the launcher's setup_commands

    client = boto3.client("secretsmanager", region_name=region)  # boto3 does not read the region from EC2
    return client.get_secret_value(SecretId=name)["SecretString"]


def gcp_secret(name: str, get_json=_get_json) -> str:
    meta = {"Metadata-Flavor": "Google"}
    project = get_json(f"{GCP_METADATA}/project/?recursive=true", meta)["projectId"]
    token = get_json(f"{GCP_METADATA}/instance/service-accounts/default/token", meta)["access_token"]
    url = f"https://secretmanager.googleapis.com/v1/projects/{project}/secrets/{name}/versions/latest:access"
    payload = get_json(url, {"Authorization": f"Bearer {token}"})["payload"]["data"]
    return base64.b64decode(payload).decode()


def main(argv: list[str]) -> int:
    if not (argv[:1] == ["aws"] and len(argv) == 3 or argv[:1] == ["gcp"] and len(argv) == 2):
        print("usage: fetch_secret.py aws SECRET_NAME REGION | gcp SECRET_NAME", file=sys.stderr)
        return 2
    provider, name = argv[:2]
    try:
        secret = aws_secret(name, argv[2]) if provider == "aws" else gcp_secret(name)
    except Exception as e:  # the message names the secret, never its value
        print(f"fetch_secret: cannot read {provider} secret {name!r}: {type(e).__name__}", file=sys.stderr)
        return 1
    sys.stdout.write(secret)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
