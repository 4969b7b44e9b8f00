"""k8s/: every Kustomize overlay renders, passes the official schemas strictly, and our own checks.

No Kubernetes API server can run here, so manifests are checked offline: `kubectl kustomize` renders
them, `kubernetes-validate` checks each object against the official schema of a pinned version, and
`check_objects` checks what schemas cannot see. Deliberately broken copies must fail.
"""

import copy
import shlex
import subprocess

import kubernetes_validate
import pytest
import yaml

from cvtk_job.cli import parse
from tests.conftest import REPO

K8S_VERSION = "1.32.0"
KUSTOMIZATIONS = [REPO / "k8s" / "base", *sorted((REPO / "k8s" / "overlays").iterdir())]


def render(folder):
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _flag(command, name):
    for i, word in enumerate(command):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return command[i + 1]
    return None


def check_objects(docs):
    """What the schemas miss; returns a list of problems (empty when all is well)."""
    problems = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for doc in docs:
        if doc["kind"] != "Job":
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"].get("metadata", {}).get("labels", {})
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(f"{name}: a Job's restartPolicy must be Never or OnFailure")
        if spec.get("podFailurePolicy") and pod.get("restartPolicy") != "Never":
            problems.append(f"{name}: podFailurePolicy needs restartPolicy Never")
        if spec.get("completionMode") == "Indexed" and not spec.get("completions"):
            problems.append(f"{name}: an Indexed Job needs completions")
        for container in pod["containers"]:
            res = container.get("resources", {})
            req, lim = res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu")
            if req != lim:
                problems.append(f"{name}: GPU request {req} differs from limit {lim}")
            sec = container.get("securityContext", {})
            if sec.get("allowPrivilegeEscalation") is not False or sec.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: container must drop ALL capabilities and forbid privilege escalation")
            command = container.get("command", [])
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            nnodes = _flag(command, "--nnodes") or env.get("PET_NNODES")
            if nnodes is not None and int(nnodes) != spec.get("completions", 1):
                problems.append(f"{name}: torchrun --nnodes={nnodes} but completions={spec.get('completions')}")
            if spec.get("completions", 1) > 1 and spec.get("parallelism") != spec.get("completions"):
                problems.append(f"{name}: parallelism must equal completions (every node at once)")
            if "torchrun" in command:
                problems.append(f"{name}: plain torchrun exits 1 whatever the job's code; use cvtk_job.torchrun")
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{name}: pods must run as non-root")
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: pods need the RuntimeDefault seccomp profile")
        subdomain = pod.get("subdomain")
        if spec.get("completionMode") == "Indexed" and subdomain not in services:
            problems.append(f"{name}: subdomain {subdomain!r} is not the name of a Service")
        if subdomain in services:
            selector = services[subdomain]["spec"].get("selector", {})
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                problems.append(f"{name}: Service {subdomain} selector {selector} does not match the pods")
    return problems


def cli_args(container):
    """The cvtk-job arguments a container runs: after entrypoint.py when torchrun starts it."""
    command, args = container.get("command", []), container.get("args", [])
    if command and command[-1].endswith("entrypoint.py"):
        return args
    return command[1:] + args if command else args


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_renders_and_passes_strict_schemas_and_our_checks(folder):
    docs = render(folder)
    assert {d["kind"] for d in docs} >= {"Job", "Service", "ServiceAccount"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert check_objects(docs) == []


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_container_arguments_parse_with_the_real_cli(folder):
    jobs = [d for d in render(folder) if d["kind"] == "Job"]
    assert len(jobs) == 3
    for job in jobs:
        for container in job["spec"]["template"]["spec"]["containers"]:
            command, opts = parse(cli_args(container))
            assert command in ("train", "inference")
            assert all(str(v).startswith("s3://") for k, v in vars(opts).items()
                       if k in ("label", "train", "data", "model_weights", "output", "output_weights"))


def test_the_example_dry_run_prints_a_plan(cli, s3_server, small_data, tmp_path):
    """The example's exact command line, against a real S3 server holding the data at the keys it names:
    the plan stages and validates it, and decides the COCO checkpoint (which the dry run does not fetch)."""
    import json

    job = next(d for d in render(REPO / "k8s" / "overlays" / "example") if d["metadata"]["name"] == "cvtk-train")
    args = cli_args(job["spec"]["template"]["spec"]["containers"][0])
    bucket = args[args.index("--label") + 1].split("/")[2]
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.upload_tree(small_data, bucket, "strawberry")
    result = cli(*args, "--dry_run", env={**s3_server.env(), "CVTK_JOB_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["options"]["output_weights"] == "s3://plant-lab/runs/2026-11/strawberry.pth"
    assert out["plan"]["outputs"]["weights"] == "s3://plant-lab/runs/2026-11/strawberry.pth"
    assert out["plan"]["pretrained"].endswith("/mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth")
    assert out["config"]["train_cfg"]["max_epochs"] == 24
    assert out["config"]["train_dataloader"]["batch_size"] == 4
    assert s3_server.keys(bucket, "runs/") == []  # nothing written
    assert not (tmp_path / "cache" / "checkpoints").exists()  # the 250 MB checkpoint is left to the run


def _broken(mutate, name="cvtk-train-multinode"):
    docs = copy.deepcopy(render(REPO / "k8s" / "base"))
    target = next(d for d in docs if d["metadata"]["name"] == name and d["kind"] == "Job")
    mutate(target, docs)
    return docs


@pytest.mark.parametrize("mutate, message", [
    (lambda j, d: j["spec"]["template"]["spec"].update(restartPolicy="Always"), "restartPolicy"),
    (lambda j, d: j["spec"].pop("completions"), "Indexed Job needs completions"),
    (lambda j, d: j["spec"]["template"]["spec"].update(subdomain="elsewhere"), "is not the name of a Service"),
    (lambda j, d: j["spec"]["template"]["metadata"]["labels"].update({"app.kubernetes.io/component": "x"}),
     "selector"),
    (lambda j, d: j["spec"].update(completions=3), "--nnodes=2 but completions=3"),
    (lambda j, d: j["spec"].update(parallelism=1), "parallelism must equal completions"),
    (lambda j, d: j["spec"]["template"]["spec"]["containers"][0].update(command=["torchrun", "/app/entrypoint.py"]),
     "plain torchrun"),
    (lambda j, d: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"nvidia.com/gpu": "2"}), "GPU request 1 differs from limit 2"),
    (lambda j, d: j["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True), "privilege escalation"),
])
def test_broken_manifests_fail_our_checks(mutate, message):
    problems = check_objects(_broken(mutate))
    assert any(message in p for p in problems), problems


def test_broken_manifests_fail_the_strict_schema():
    docs = _broken(lambda j, d: j["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicey="Always"))
    job = next(d for d in docs if d["metadata"]["name"] == "cvtk-train-multinode" and d["kind"] == "Job")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    docs = _broken(lambda j, d: j["spec"].update(backoffLimit="three"))
    job = next(d for d in docs if d["metadata"]["name"] == "cvtk-train-multinode" and d["kind"] == "Job")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


SECRET = "cvtk-s3"  # the S3 credentials Secret the base's Jobs read
SECRET_KUSTOMIZATIONS = [REPO / "k8s" / "base", REPO / "k8s" / "overlays" / "example",
                         REPO / "k8s" / "overlays" / "kueue"]
IRSA = REPO / "k8s" / "overlays" / "irsa"
ROLE_ARN = "arn:aws:iam::111122223333:role/cvtk-job"  # the overlay's placeholder


def secret_refs(container):
    """The Secrets a container's environment reads: envFrom secretRefs and env secretKeyRefs."""
    refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
    return refs + [e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
                   if "secretKeyRef" in e.get("valueFrom", {})]


def secret_problems(docs):
    """Every container of every Job must read the Secret, and not optionally: a pod whose Secret is
    missing must wait in CreateContainerConfigError, never run with the node's IAM role."""
    problems = []
    for job in (d for d in docs if d["kind"] == "Job"):
        for container in job["spec"]["template"]["spec"]["containers"]:
            where = f"{job['metadata']['name']}/{container['name']}"
            refs = [r for r in secret_refs(container) if r.get("name") == SECRET]
            if not refs:
                problems.append(f"{where}: does not read the Secret {SECRET}")
            if any(r.get("optional") for r in refs):
                problems.append(f"{where}: the Secret {SECRET} is optional; without it the pod runs as the node")
    return problems


@pytest.mark.parametrize("folder", SECRET_KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_credentials_secret_is_required_in_every_job(folder):
    docs = render(folder)
    assert len([d for d in docs if d["kind"] == "Job"]) == 3
    assert secret_problems(docs) == []


@pytest.mark.parametrize("name", ["cvtk-train", "cvtk-train-multinode", "cvtk-inference"])
@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["envFrom"][0]["secretRef"].update(optional=True), "is optional"),
    (lambda c: c.pop("envFrom"), "does not read the Secret"),
    (lambda c: c.update(envFrom=[], env=[*c["env"], {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {
        "secretKeyRef": {"name": SECRET, "key": "AWS_ACCESS_KEY_ID", "optional": True}}}]), "is optional"),
])
def test_an_optional_or_missing_secret_fails_our_check(name, mutate, message):
    docs = _broken(lambda j, d: mutate(j["spec"]["template"]["spec"]["containers"][0]), name=name)
    problems = secret_problems(docs)
    assert problems and all(p.startswith(f"{name}/cvtk: ") for p in problems), problems
    assert any(message in p for p in problems), problems


def test_the_irsa_overlay_uses_the_service_account_role_and_no_secret():
    docs = render(IRSA)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert check_objects(docs) == []
    assert SECRET not in yaml.safe_dump_all(docs)
    jobs = [d for d in docs if d["kind"] == "Job"]
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert len(jobs) == 3 and len(accounts) == 1
    account = accounts[0]["metadata"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"] == ROLE_ARN
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert (pod["serviceAccountName"], job["metadata"]["namespace"]) == (account["name"], account["namespace"])
        for container in pod["containers"]:
            assert secret_refs(container) == []
            assert {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"} in container["env"]  # never the node's role


def test_the_irsa_overlay_is_the_example_without_the_secret():
    """Patches, not copies: apart from identity, the irsa overlay renders exactly the example."""
    expected = render(REPO / "k8s" / "overlays" / "example")
    for doc in expected:
        if doc["kind"] == "ServiceAccount":
            doc["metadata"]["annotations"] = {"eks.amazonaws.com/role-arn": ROLE_ARN}
        if doc["kind"] == "Job":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container.pop("envFrom") == [{"secretRef": {"name": SECRET}}]
                container["env"].append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    assert render(IRSA) == expected


def sbatch_examples(script):
    """The `sbatch …` command lines in a template's header comment, continuation lines joined."""
    text, lines = "", []
    for line in script.read_text().splitlines():
        if not line.startswith("#"):
            continue
        body = line.lstrip("#").strip()
        if body.startswith("sbatch ") or text:
            text += body.rstrip("\\").strip() + " "
            if not body.endswith("\\"):
                lines.append(text.strip())
                text = ""
    return lines


@pytest.mark.parametrize("script", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_examples_parse_with_the_real_cli(script):
    examples = sbatch_examples(script)
    assert examples, f"{script.name} shows no example"
    verb = "inference" if "inference" in script.name else "train"
    assert f"run_cvtk {verb} \"$@\"" in script.read_text()
    for example in examples:
        words = shlex.split(example.replace("…", "x"))
        args = words[words.index(next(w for w in words if w.endswith(".sbatch"))) + 1:]
        command, _ = parse([verb, *args])
        assert command == verb
