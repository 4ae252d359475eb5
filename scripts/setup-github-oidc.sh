#!/usr/bin/env bash
# Create (or update) the AWS side of GitHub Actions OIDC for walship's infrastructure workflow,
# with the AWS CLI:
#
#   1. the IAM OIDC identity provider for https://token.actions.githubusercontent.com
#      (audience sts.amazonaws.com), once per AWS account;
#   2. the deploy role, assumable only by workflow runs of ONE repository on ONE branch
#      (sub = repo:<owner>/<name>:ref:refs/heads/<branch>), used by `pulumi up`;
#   3. the preview role, assumable only by pull-request runs of that repository
#      (sub = repo:<owner>/<name>:pull_request), read-only, used by `pulumi preview`.
#
# Their permissions are the same as pulumi/Pulumi.yaml gives them (tests/deploy checks that
# the two stay equal). Use it when IAM is managed outside Pulumi, or to set up the GitHub side
# before the first `pulumi up`; docs/github-oidc.md walks through both ways and shows how the
# stack adopts roles this script created.
#
# Run it with administrator credentials (AWS_PROFILE=... or the usual AWS_* variables).
set -euo pipefail

readonly GITHUB_ISSUER=token.actions.githubusercontent.com
# Intermediate CA thumbprints GitHub publishes; IAM ignores them for this issuer (it trusts its
# own CA library), older CLI versions insist on the argument.
readonly GITHUB_THUMBPRINTS=(6938fd4d98bab03faadb97b34396831e3780aea1 1c58a3a8518e8759bf075b76b750d4f2df264fcd)

usage() {
    cat <<'USAGE'
Usage: scripts/setup-github-oidc.sh --repo OWNER/NAME --app FLY_APP --fly-org ORG --bucket BUCKET [options]

Creates the GitHub Actions OIDC provider and the walship infra deploy/preview roles in AWS IAM.

Required:
  --repo OWNER/NAME        GitHub repository whose workflows may assume the roles
  --app FLY_APP            fly.io app name (the stack's flyApp; role names derive from it)
  --fly-org ORG            fly.io organization slug (the stack's flyOrg)
  --bucket BUCKET          the replica bucket (the stack's bucketName)

Options:
  --branch BRANCH          branch allowed to assume the deploy role (default: main)
  --account-id ID          12-digit AWS account id (default: from `aws sts get-caller-identity`)
  --deploy-role-name NAME  default: <app>-walship-deploy
  --preview-role-name NAME default: <app>-walship-preview
  --no-preview-role        do not create the read-only pull-request role
  --dry-run                print every aws command instead of running it (no AWS access needed)
  -h, --help               show this help

Example:
  scripts/setup-github-oidc.sh --dry-run --repo my-org/walship --app walship-example \
      --fly-org my-org --bucket walship-example-backups --account-id 123456789012
USAGE
}

die() {
    printf 'setup-github-oidc: error: %s\n' "$*" >&2
    printf "Run 'scripts/setup-github-oidc.sh --help' for usage.\n" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Arguments
repo="" app="" fly_org="" bucket="" branch="main" account_id=""
deploy_role="" preview_role="" with_preview=1 dry_run=0

need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --repo) need_value "$@"; repo=$2; shift 2 ;;
        --app) need_value "$@"; app=$2; shift 2 ;;
        --fly-org) need_value "$@"; fly_org=$2; shift 2 ;;
        --bucket) need_value "$@"; bucket=$2; shift 2 ;;
        --branch) need_value "$@"; branch=$2; shift 2 ;;
        --account-id) need_value "$@"; account_id=$2; shift 2 ;;
        --deploy-role-name) need_value "$@"; deploy_role=$2; shift 2 ;;
        --preview-role-name) need_value "$@"; preview_role=$2; shift 2 ;;
        --no-preview-role) with_preview=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'" ;;
    esac
done

[[ -n "${repo}" ]] || die "--repo is required"
[[ -n "${app}" ]] || die "--app is required"
[[ -n "${fly_org}" ]] || die "--fly-org is required"
[[ -n "${bucket}" ]] || die "--bucket is required"

[[ "${repo}" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] \
    || die "--repo must look like owner/name, got '${repo}'"
[[ "${branch}" =~ ^[A-Za-z0-9_./-]+$ && "${branch}" != *..* ]] \
    || die "--branch must be one plain branch name (no wildcards), got '${branch}'"
[[ "${app}" =~ ^[a-z0-9][a-z0-9-]*$ ]] \
    || die "--app must be a fly.io app name (lowercase letters, digits, dashes), got '${app}'"
[[ "${fly_org}" =~ ^[a-z0-9][a-z0-9-]*$ ]] \
    || die "--fly-org must be a fly.io org slug (lowercase letters, digits, dashes), got '${fly_org}'"
[[ "${bucket}" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] \
    || die "--bucket must be a valid S3 bucket name, got '${bucket}'"

deploy_role=${deploy_role:-${app}-walship-deploy}
preview_role=${preview_role:-${app}-walship-preview}
for name in "${deploy_role}" "${preview_role}"; do
    [[ "${name}" =~ ^[A-Za-z0-9+=,.@_-]{1,64}$ ]] || die "invalid IAM role name '${name}'"
done

if [[ -z "${account_id}" ]]; then
    if ((dry_run)); then
        account_id=123456789012
        printf '# dry run: no --account-id given, using %s in ARNs\n' "${account_id}"
    else
        command -v aws >/dev/null 2>&1 || die "the AWS CLI (aws) is not installed"
        account_id=$(aws sts get-caller-identity --query Account --output text) \
            || die "cannot read the account id (are AWS credentials configured?)"
    fi
fi
[[ "${account_id}" =~ ^[0-9]{12}$ ]] || die "--account-id must be 12 digits, got '${account_id}'"

if ((!dry_run)); then
    command -v aws >/dev/null 2>&1 || die "the AWS CLI (aws) is not installed"
fi

# ---------------------------------------------------------------------------------------------
# Names and ARNs (the same as pulumi/Pulumi.yaml derives them)
fly_issuer="oidc.fly.io/${fly_org}"
fly_role_arn="arn:aws:iam::${account_id}:role/${app}-walship"
fly_boundary_arn="arn:aws:iam::${account_id}:policy/${app}-walship-boundary"
deploy_role_arn="arn:aws:iam::${account_id}:role/${deploy_role}"
preview_role_arn="arn:aws:iam::${account_id}:role/${preview_role}"
fly_oidc_arn="arn:aws:iam::${account_id}:oidc-provider/${fly_issuer}"
github_oidc_arn="arn:aws:iam::${account_id}:oidc-provider/${GITHUB_ISSUER}"
bucket_arn="arn:aws:s3:::${bucket}"

# Permission lists: keep in step with the variables of the same names in pulumi/Pulumi.yaml.
bucket_read_actions=(
    s3:GetAccelerateConfiguration s3:GetBucketAcl s3:GetBucketCORS s3:GetBucketLocation
    s3:GetBucketLogging s3:GetBucketObjectLockConfiguration s3:GetBucketOwnershipControls
    s3:GetBucketPolicy s3:GetBucketPublicAccessBlock s3:GetBucketRequestPayment
    s3:GetBucketTagging s3:GetBucketVersioning s3:GetBucketWebsite s3:GetEncryptionConfiguration
    s3:GetLifecycleConfiguration s3:GetReplicationConfiguration s3:ListBucket
)
iam_role_read_actions=(iam:GetRole iam:GetRolePolicy iam:ListAttachedRolePolicies iam:ListRolePolicies)
iam_oidc_read_actions=(iam:GetOpenIDConnectProvider)
iam_policy_read_actions=(iam:GetPolicy iam:GetPolicyVersion iam:ListPolicyVersions)
bucket_write_actions=(
    s3:CreateBucket s3:PutBucketOwnershipControls s3:PutBucketPolicy s3:PutBucketPublicAccessBlock
    s3:PutBucketTagging s3:PutBucketVersioning s3:PutEncryptionConfiguration
    s3:PutLifecycleConfiguration
)
fly_role_policy_write_actions=(iam:DeleteRolePolicy iam:PutRolePolicy)

# ---------------------------------------------------------------------------------------------
# JSON helpers (values here never contain quotes or backslashes: validated above)
json_list() {
    local out="" item
    for item in "$@"; do
        out+="${out:+,}\"${item}\""
    done
    printf '[%s]' "${out}"
}

statement() { # SID ACTIONS_JSON RESOURCES_JSON [CONDITION_JSON]
    local cond=""
    [[ $# -ge 4 ]] && cond=",\"Condition\":$4"
    printf '{"Sid":"%s","Effect":"Allow","Action":%s,"Resource":%s%s}' "$1" "$2" "$3" "${cond}"
}

trust_policy() { # SID SUB
    printf '{"Version":"2012-10-17","Statement":[{"Sid":"%s","Effect":"Allow","Principal":{"Federated":"%s"},"Action":"sts:AssumeRoleWithWebIdentity","Condition":{"StringEquals":{"%s:aud":"sts.amazonaws.com","%s:sub":"%s"}}}]}' \
        "$1" "${github_oidc_arn}" "${GITHUB_ISSUER}" "${GITHUB_ISSUER}" "$2"
}

read_statements() {
    local roles providers
    roles=$(json_list "${fly_role_arn}" "${deploy_role_arn}" "${preview_role_arn}")
    providers=$(json_list "${fly_oidc_arn}" "${github_oidc_arn}")
    statement ReadBucketSettings "$(json_list "${bucket_read_actions[@]}")" "\"${bucket_arn}\""
    printf ','
    statement ReadStackRoles "$(json_list "${iam_role_read_actions[@]}")" "${roles}"
    printf ','
    statement ReadStackOidcProviders "$(json_list "${iam_oidc_read_actions[@]}")" "${providers}"
    printf ','
    statement ReadFlyRoleBoundary "$(json_list "${iam_policy_read_actions[@]}")" "\"${fly_boundary_arn}\""
}

deploy_policy() {
    printf '{"Version":"2012-10-17","Statement":['
    read_statements
    printf ','
    statement WriteBucketSettings "$(json_list "${bucket_write_actions[@]}")" "\"${bucket_arn}\""
    printf ','
    statement WriteFlyRoleInlinePolicyWithinBoundary \
        "$(json_list "${fly_role_policy_write_actions[@]}")" "\"${fly_role_arn}\"" \
        "{\"StringEquals\":{\"iam:PermissionsBoundary\":\"${fly_boundary_arn}\"}}"
    printf ']}'
}

preview_policy() {
    printf '{"Version":"2012-10-17","Statement":['
    read_statements
    printf ']}'
}

# ---------------------------------------------------------------------------------------------
# Running (or printing) aws commands
quote_arg() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        local q="'\\''"
        printf "'%s'" "${1//\'/${q}}"
    fi
}

print_cmd() {
    local arg line="+"
    for arg in "$@"; do
        line+=" $(quote_arg "${arg}")"
    done
    printf '%s\n' "${line}"
}

run_aws() {
    print_cmd aws "$@"
    if ((!dry_run)); then
        aws "$@"
    fi
}

# True when the resource exists. In a dry run nothing is asked and everything is "missing",
# so the output shows the create commands.
exists() {
    if ((dry_run)); then
        return 1
    fi
    aws "$@" >/dev/null 2>&1
}

ensure_role() { # NAME DESCRIPTION TRUST_POLICY POLICY_NAME POLICY
    local name=$1 description=$2 trust=$3 policy_name=$4 policy=$5
    if exists iam get-role --role-name "${name}"; then
        printf '# role %s exists: updating its trust policy\n' "${name}"
        run_aws iam update-assume-role-policy --role-name "${name}" --policy-document "${trust}"
    else
        run_aws iam create-role --role-name "${name}" --description "${description}" \
            --max-session-duration 3600 --assume-role-policy-document "${trust}" \
            --tags Key=app,Value="${app}" Key=component,Value=walship Key=managed-by,Value=setup-github-oidc
    fi
    run_aws iam put-role-policy --role-name "${name}" --policy-name "${policy_name}" \
        --policy-document "${policy}"
}

# ---------------------------------------------------------------------------------------------
if ((dry_run)); then
    printf '# dry run: printing the aws commands, running none\n'
fi

if exists iam get-open-id-connect-provider --open-id-connect-provider-arn "${github_oidc_arn}"; then
    printf '# OIDC provider %s exists: keeping it\n' "${github_oidc_arn}"
else
    run_aws iam create-open-id-connect-provider --url "https://${GITHUB_ISSUER}" \
        --client-id-list sts.amazonaws.com --thumbprint-list "${GITHUB_THUMBPRINTS[@]}"
fi

ensure_role "${deploy_role}" \
    "pulumi up for walship-infra from ${repo} on ${branch} only." \
    "$(trust_policy OneRepoOneBranch "repo:${repo}:ref:refs/heads/${branch}")" \
    walship-infra-deploy "$(deploy_policy)"

if ((with_preview)); then
    ensure_role "${preview_role}" \
        "pulumi preview (read-only) for walship-infra from pull requests of ${repo}." \
        "$(trust_policy PullRequestsOfOneRepo "repo:${repo}:pull_request")" \
        walship-infra-preview "$(preview_policy)"
fi

cat <<DONE
# Done. Set these repository variables for .github/workflows/infra.yml:
#   AWS_DEPLOY_ROLE_ARN=${deploy_role_arn}
#   AWS_PREVIEW_ROLE_ARN=${preview_role_arn}
# If pulumi/ should manage these roles too, have the stack adopt them instead of creating
# them (a second create fails with EntityAlreadyExists): see "Adopting roles created by
# scripts/setup-github-oidc.sh" in docs/github-oidc.md.
DONE
