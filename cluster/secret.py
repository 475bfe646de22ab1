"""Print one secret from the cloud's secret manager, for the `ray start` commands of cluster/aws.yaml
and cluster/gcp.yaml:

    export OPENAI_API_KEY="$(python cluster/secret.py aws us-east-1 rayalign/openai-api-key)"
    python cluster/secret.py gcp my-gcp-project rayalign-ray-auth-token > ~/.ray/auth_token

The value goes to stdout only (into the environment of `ray start`, or Ray's token file), so it is
never written into the repository, a config or a run directory. The node's instance role or
service account must be allowed to read the secret.
"""

import sys


def aws(region: str, name: str) -> str:
    import boto3

    return boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=name)["SecretString"]


def gcp(project: str, name: str) -> str:
    from google.cloud import secretmanager

    version = f"projects/{project}/secrets/{name}/versions/latest"
    return secretmanager.SecretManagerServiceClient().access_secret_version(name=version).payload.data.decode()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("aws", "gcp"):
        sys.exit("usage: secret.py aws REGION NAME | secret.py gcp PROJECT NAME")
    provider, where, name = sys.argv[1:]
    print({"aws": aws, "gcp": gcp}[provider](where, name), end="")
