"""Security properties of pulumi/Pulumi.yaml, checked without AWS or the pulumi CLI.

The program is rendered with the example stack (Pulumi.dev.yaml): config values, variables and
the few resource outputs the policies use are substituted, so every policy is checked as the
concrete JSON document AWS would receive.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run

PULUMI = ROOT / "pulumi"
ACCOUNT = "123456789012"
REF = re.compile(r"\$\{([^}]+)\}")

# Resource types this program may use; a typo in a type token fails here, not at `pulumi up`.
KNOWN_TYPES = {
    "pulumi:providers:aws",
    "aws:s3:Bucket",
    "aws:s3:BucketOwnershipControls",
    "aws:s3:BucketPublicAccessBlock",
    "aws:s3:BucketServerSideEncryptionConfiguration",
    "aws:s3:BucketVersioning",
    "aws:s3:BucketLifecycleConfiguration",
    "aws:s3:BucketPolicy",
    "aws:iam:OpenIdConnectProvider",
    "aws:iam:Policy",
    "aws:iam:Role",
    "aws:iam:RolePolicy",
}


def load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


PROGRAM = load(PULUMI / "Pulumi.yaml")
STACK = load(PULUMI / "Pulumi.dev.yaml")
RESOURCES: dict = PROGRAM["resources"]
VARIABLES: dict = PROGRAM["variables"]


def stack_config() -> dict:
    project = PROGRAM["name"]
    config = {k: v["default"] for k, v in PROGRAM["config"].items() if "default" in v}
    for key, value in STACK["config"].items():
        namespace, _, name = key.partition(":")
        if namespace == project:
            config[name] = value
    return config


CONFIG = stack_config()
ORG, APP = CONFIG["flyOrg"], CONFIG["flyApp"]
BUCKET, PREFIX = CONFIG["bucketName"], CONFIG["prefix"]
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
FLY_ISSUER = f"oidc.fly.io/{ORG}"
GH_ISSUER = "token.actions.githubusercontent.com"

# Resource outputs the policies refer to, as AWS would fill them in.
OUTPUTS = {
    "aws": "<provider>",
    "accountId": ACCOUNT,
    "bucket.arn": BUCKET_ARN,
    "bucket.id": BUCKET,
    "bucket.bucket": BUCKET,
    "flyOidcProvider.arn": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{FLY_ISSUER}",
    "githubOidcProvider.arn": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{GH_ISSUER}",
    "flyRoleBoundary.arn": f"arn:aws:iam::{ACCOUNT}:policy/{APP}-walship-boundary",
    "flyRole.id": f"{APP}-walship",
    "githubDeployRole.id": f"{APP}-walship-deploy",
    "githubPreviewRole.id": f"{APP}-walship-preview",
}


def render(value):
    """Substitute config, variables and known outputs; unwrap fn::toJSON to its structure."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{([^}]+)\}", value)
        if whole and whole.group(1) in VARIABLES and whole.group(1) != "accountId":
            return render(VARIABLES[whole.group(1)])

        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name in OUTPUTS:
                return OUTPUTS[name]
            if name in CONFIG:
                return str(CONFIG[name])
            if name in VARIABLES:
                rendered = render(VARIABLES[name])
                assert isinstance(rendered, str), f"${{{name}}} is not a string"
                return rendered
            return m.group(0)

        return REF.sub(sub, value)
    if isinstance(value, dict):
        if set(value) == {"fn::toJSON"}:
            return render(value["fn::toJSON"])
        return {render(k): render(v) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v) for v in value]
    return value


def props(name: str) -> dict:
    return render(RESOURCES[name].get("properties", {}))


def of_type(type_: str) -> dict[str, dict]:
    return {n: r for n, r in RESOURCES.items() if r["type"] == type_}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def statements(policy: dict) -> list[dict]:
    assert policy.get("Version") == "2012-10-17", policy
    return as_list(policy["Statement"])


def iam_policies() -> dict[str, dict]:
    """Every IAM policy document in the program: identity, boundary and trust policies."""
    docs = {}
    for name, res in RESOURCES.items():
        p = props(name)
        if res["type"] in ("aws:iam:RolePolicy", "aws:iam:Policy"):
            docs[f"{name}.policy"] = p["policy"]
        if res["type"] == "aws:iam:Role":
            docs[f"{name}.assumeRolePolicy"] = p["assumeRolePolicy"]
    return docs


def test_program_shape():
    assert PROGRAM["runtime"] == "yaml"
    assert PROGRAM["name"] == "walship-infra"
    for name, res in RESOURCES.items():
        assert res["type"] in KNOWN_TYPES, f"{name}: unexpected resource type {res['type']}"


def test_every_reference_resolves():
    names = set(PROGRAM["config"]) | set(VARIABLES) | set(RESOURCES)
    text = (PULUMI / "Pulumi.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for ref in REF.findall(body):
        head = re.split(r"[.\[]", ref, maxsplit=1)[0]
        assert head in names, f"${{{ref}}} refers to nothing named {head!r}"


def test_stack_config_matches_declarations():
    project = PROGRAM["name"]
    declared = PROGRAM["config"]
    for key in STACK["config"]:
        namespace, _, name = key.partition(":")
        assert namespace == project, f"Pulumi.dev.yaml: {key} is not in namespace {project}"
        assert name in declared, f"Pulumi.dev.yaml sets undeclared config {key}"
    for name, decl in declared.items():
        if "default" not in decl:
            assert name in CONFIG, f"required config {name} missing from Pulumi.dev.yaml"


def test_explicit_pinned_provider():
    provider = RESOURCES["aws"]
    assert provider["type"] == "pulumi:providers:aws"
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(provider["options"]["version"]))
    for name, res in RESOURCES.items():
        if name != "aws":
            assert res.get("options", {}).get("provider") == "${aws}", f"{name} not on ${{aws}}"


def test_bucket_is_protected_and_private():
    (name,) = of_type("aws:s3:Bucket")
    bucket = RESOURCES[name]
    assert bucket["options"].get("protect") is True, "the backup bucket must be protected"
    assert props(name).get("forceDestroy") is False
    assert "acl" not in props(name)
    (own,) = of_type("aws:s3:BucketOwnershipControls")
    assert props(own)["rule"]["objectOwnership"] == "BucketOwnerEnforced"


def test_public_access_block_all_true():
    (name,) = of_type("aws:s3:BucketPublicAccessBlock")
    p = props(name)
    assert p["bucket"] == BUCKET
    for key in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"):
        assert p.get(key) is True, f"{key} must be true"


def test_default_server_side_encryption():
    (name,) = of_type("aws:s3:BucketServerSideEncryptionConfiguration")
    p = props(name)
    assert p["bucket"] == BUCKET
    (rule,) = p["rules"]
    assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] in ("AES256", "aws:kms")
    assert PROGRAM["config"]["sseAlgorithm"]["default"] in ("AES256", "aws:kms")


def test_versioning_enabled():
    (name,) = of_type("aws:s3:BucketVersioning")
    p = props(name)
    assert p["bucket"] == BUCKET
    assert p["versioningConfiguration"]["status"] == "Enabled"


def test_lifecycle_expires_noncurrent_versions():
    (name,) = of_type("aws:s3:BucketLifecycleConfiguration")
    p = props(name)
    rules = [r for r in p["rules"] if r.get("status") == "Enabled"]
    days = [int(r["noncurrentVersionExpiration"]["noncurrentDays"])
            for r in rules if "noncurrentVersionExpiration" in r]
    assert days and all(d > 0 for d in days)
    assert any("abortIncompleteMultipartUpload" in r for r in rules)
    (versioning,) = of_type("aws:s3:BucketVersioning")
    assert f"${{{versioning}}}" in RESOURCES[name]["options"]["dependsOn"]


def test_tls_only_bucket_policy():
    (name,) = of_type("aws:s3:BucketPolicy")
    p = props(name)
    assert p["bucket"] == BUCKET
    denies = [s for s in statements(p["policy"]) if s["Effect"] == "Deny"]
    tls = [s for s in denies
           if s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    assert tls, "no Deny on aws:SecureTransport=false"
    (s,) = tls
    assert s["Principal"] == "*"
    assert "s3:*" in as_list(s["Action"])
    assert set(as_list(s["Resource"])) == {BUCKET_ARN, f"{BUCKET_ARN}/*"}
    assert all(s["Effect"] == "Deny" for s in statements(p["policy"])), \
        "the bucket policy must only deny (access is granted by IAM roles)"


def test_no_wildcards_in_allowed_actions_or_resources():
    object_arn = f"{BUCKET_ARN}/{PREFIX}/*"
    for where, doc in iam_policies().items():
        for s in statements(doc):
            if s["Effect"] != "Allow":
                continue
            for action in as_list(s["Action"]):
                assert "*" not in action, f"{where}: wildcard action {action}"
            if "Resource" in s:
                for resource in as_list(s["Resource"]):
                    assert "${" not in resource, f"{where}: unresolved {resource}"
                    assert resource == object_arn or "*" not in resource, \
                        f"{where}: wildcard resource {resource}"
            assert "NotAction" not in s and "NotResource" not in s, where


def test_fly_oidc_provider():
    p = props("flyOidcProvider")
    assert p["url"] == f"https://{FLY_ISSUER}"
    assert p["clientIdLists"] == ["sts.amazonaws.com"]


def test_github_oidc_provider():
    p = props("githubOidcProvider")
    assert p["url"] == f"https://{GH_ISSUER}"
    assert p["clientIdLists"] == ["sts.amazonaws.com"]


def web_identity_statement(role: str, provider_arn: str) -> dict:
    (s,) = statements(props(role)["assumeRolePolicy"])
    assert s["Effect"] == "Allow"
    assert s["Principal"] == {"Federated": provider_arn}, f"{role}: trusted principal"
    assert s["Action"] == "sts:AssumeRoleWithWebIdentity"
    return s


def test_fly_role_trusts_one_app_only():
    s = web_identity_statement("flyRole", OUTPUTS["flyOidcProvider.arn"])
    cond = s["Condition"]
    assert cond["StringEquals"] == {f"{FLY_ISSUER}:aud": "sts.amazonaws.com"}
    # fly's sub is <org>:<app>:<machine>: exactly this app, any of its machines.
    assert cond["StringLike"] == {f"{FLY_ISSUER}:sub": f"{ORG}:{APP}:*"}
    assert set(cond) == {"StringEquals", "StringLike"}


def test_fly_role_permissions_are_prefix_scoped():
    p = props("flyRolePolicy")
    assert p["role"] == f"{APP}-walship"
    stmts = statements(p["policy"])
    actions = {a for s in stmts for a in as_list(s["Action"])}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    (listing,) = [s for s in stmts if "s3:ListBucket" in as_list(s["Action"])]
    assert as_list(listing["Action"]) == ["s3:ListBucket"]
    assert listing["Resource"] == BUCKET_ARN
    assert set(listing["Condition"]["StringLike"]["s3:prefix"]) == {PREFIX, f"{PREFIX}/*"}
    (objects,) = [s for s in stmts if "s3:GetObject" in as_list(s["Action"])]
    assert set(as_list(objects["Action"])) == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    assert as_list(objects["Resource"]) == [f"{BUCKET_ARN}/{PREFIX}/*"]


def test_fly_role_has_boundary_equal_to_its_policy():
    assert props("flyRole")["permissionsBoundary"] == OUTPUTS["flyRoleBoundary.arn"]
    assert props("flyRoleBoundary")["policy"] == props("flyRolePolicy")["policy"]


def test_github_deploy_role_trusts_one_repo_and_branch():
    s = web_identity_statement("githubDeployRole", OUTPUTS["githubOidcProvider.arn"])
    assert s["Condition"] == {"StringEquals": {
        f"{GH_ISSUER}:aud": "sts.amazonaws.com",
        f"{GH_ISSUER}:sub": f"repo:{CONFIG['githubRepo']}:ref:refs/heads/{CONFIG['githubBranch']}",
    }}


def test_github_preview_role_trusts_pull_requests_and_only_reads():
    s = web_identity_statement("githubPreviewRole", OUTPUTS["githubOidcProvider.arn"])
    assert s["Condition"] == {"StringEquals": {
        f"{GH_ISSUER}:aud": "sts.amazonaws.com",
        f"{GH_ISSUER}:sub": f"repo:{CONFIG['githubRepo']}:pull_request",
    }}
    for st in statements(props("githubPreviewRolePolicy")["policy"]):
        for action in as_list(st["Action"]):
            verb = action.split(":", 1)[1]
            assert verb.startswith(("Get", "List")), f"preview role may not {action}"


def test_github_deploy_role_cannot_touch_objects_or_iam_trust():
    stmts = statements(props("githubDeployRolePolicy")["policy"])
    actions = {a for s in stmts for a in as_list(s["Action"])}
    forbidden = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:DeleteBucket",
                 "s3:DeleteBucketPolicy", "iam:CreateRole", "iam:UpdateAssumeRolePolicy",
                 "iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary",
                 "iam:CreatePolicyVersion", "iam:PassRole"}
    assert not actions & forbidden, actions & forbidden
    writes = [s for s in stmts if "iam:PutRolePolicy" in as_list(s["Action"])]
    for s in writes:
        assert s["Resource"] == f"arn:aws:iam::{ACCOUNT}:role/{APP}-walship"
        assert s["Condition"]["StringEquals"]["iam:PermissionsBoundary"] == \
            OUTPUTS["flyRoleBoundary.arn"]


def test_outputs():
    outputs = PROGRAM["outputs"]
    for key in ("flyRoleArn", "githubDeployRoleArn", "githubPreviewRoleArn", "replicaUrl"):
        assert key in outputs
    assert render(outputs["replicaUrl"]).startswith(f"s3://{BUCKET}/{PREFIX}?")


# -- scripts/setup-github-oidc.sh must create the same GitHub roles as the stack ------------

def script_documents() -> dict[tuple[str, str], dict]:
    """(aws subcommand, role name) -> JSON document printed by a --dry-run."""
    result = run(["bash", "scripts/setup-github-oidc.sh", "--dry-run",
                  "--repo", CONFIG["githubRepo"], "--branch", CONFIG["githubBranch"],
                  "--app", APP, "--fly-org", ORG, "--bucket", BUCKET,
                  "--account-id", ACCOUNT])
    assert result.returncode == 0, result.stderr
    docs = {}
    for line in result.stdout.splitlines():
        if not line.startswith("+ aws "):
            continue
        argv = shlex.split(line[2:])
        sub = argv[2]
        opts = dict(zip(argv[3::2], argv[4::2])) if sub != "create-open-id-connect-provider" else {}
        for flag in ("--assume-role-policy-document", "--policy-document"):
            if flag in opts:
                docs[(sub, opts["--role-name"])] = json.loads(opts[flag])
    return docs


def normalized(doc: dict) -> dict:
    out = {}
    for s in statements(doc):
        s = dict(s)
        s["Action"] = sorted(as_list(s["Action"]))
        if "Resource" in s:
            s["Resource"] = sorted(as_list(s["Resource"]))
        out[s["Sid"]] = s
    return out


@pytest.mark.parametrize("role,policy", [
    ("githubDeployRole", "githubDeployRolePolicy"),
    ("githubPreviewRole", "githubPreviewRolePolicy"),
])
def test_setup_script_matches_stack(role, policy):
    docs = script_documents()
    name = props(role)["name"]
    assert normalized(docs[("create-role", name)]) == normalized(props(role)["assumeRolePolicy"])
    assert normalized(docs[("put-role-policy", name)]) == normalized(props(policy)["policy"])
