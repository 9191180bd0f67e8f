"""infra/ checked without a container engine or a cluster: every file parses, validates against the
schema its tool uses where a package ships one offline (compose-spec, kubernetes-validate, Prefect's
own prefect.yaml model), and agrees with the repository: its `mnistops` command lines parse with the
real CLI, its entrypoints import, the variables one file reads are set by the others.

What can run without an engine runs elsewhere: the inference image's steps in
tests/test_infra_images.py, the work-pool deployments in tests/test_infra_workpool.py."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from dockerfile import instructions
from flows.settings import INFERENCE_CRON, TRAINING_CRON

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
PREFECT_YAML = INFRA / "prefect.yaml"
K8S = sorted((INFRA / "k8s").glob("*.yaml"))
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))

# The flows and schedules the deployments must declare (issue 6).
# The deployments of prefect.yaml are the ones `mnistops serve` serves, on the same schedules.
EXPECTED_DEPLOYMENTS = {
    "training-nightly": ("flows.training:training_pipeline", TRAINING_CRON),
    "inference-hourly": ("flows.inference:batch_inference", INFERENCE_CRON),
}
CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_USER$|CONNECTION_URL|STORE_URI")
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")  # ${VAR...}, not the escaped $${VAR}


def _needs(module: str, pip_name: str):
    return pytest.importorskip(module, reason=f"schema check needs `pip install {pip_name}`")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    """Containers of a workload, wherever its kind keeps the pod template."""
    spec = doc.get("spec", {})
    if doc["kind"] == "PyTorchJob":
        templates = [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    elif "template" in spec:
        templates = [spec["template"]]
    else:
        return []
    return [c for t in templates for c in t["spec"]["containers"]]


def _option(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


# ---------------------------------------------------------------------------------------------- YAML


# ------------------------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_spec():
    compose_spec = _needs("compose_spec", "compose-spec")
    # apply_merge: the file shares blocks through YAML merge keys (<<), which compose resolves.
    compose_spec.PyOptions(apply_merge=True).from_yaml(COMPOSE.read_text()).validate()


def test_compose_services_are_buildable_and_wired():
    services = _compose()["services"]
    for expected in ("postgres", "minio", "createbuckets", "mlflow", "prefect-server", "worker", "trainer"):
        assert expected in services
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), f"{name}: Dockerfile not found"
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = how.get("condition")
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, it has no healthcheck"


def test_compose_publishes_on_loopback_only():
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond 127.0.0.1"


def test_compose_gpu_services_reserve_nvidia_devices():
    services = _compose()["services"]
    for name in ("worker", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_credentials_come_from_the_env_file():
    text = COMPOSE.read_text()
    example = _env_example()
    referenced = set(VAR_REF.findall(text))
    assert referenced, "compose reads no variable from the env file"
    assert referenced <= set(example), f"not in infra/.env.example: {sorted(referenced - set(example))}"
    for name, svc in _compose()["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            if CREDENTIAL_KEY.search(key):
                assert VAR_REF.search(str(value)), f"{name}.{key} is a literal, not a ${{VAR}} from infra/.env"


def test_env_file_is_ignored_and_its_example_has_no_real_secret():
    assert ENV_EXAMPLE.is_file()
    for key, value in _env_example().items():
        if "PASSWORD" in key:
            assert value.startswith("change-me"), f"{key} in .env.example looks like a real password"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"


# ---------------------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_match_the_kubernetes_schemas():
    kv = _needs("kubernetes_validate", "kubernetes-validate")
    version = "1.30"  # a cluster version that has Indexed Jobs and the controller-uid label
    for file, d in _k8s_docs():
        if d["kind"] == "PyTorchJob":
            # A custom resource has no schema here; its pod templates are core PodTemplateSpecs.
            for role, replica in d["spec"]["pytorchReplicaSpecs"].items():
                wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                           "template": replica["template"]}
                kv.validate(wrapper, version, strict=True)
        else:
            kv.validate(d, version, strict=True)


# What the kubelet puts in place of $(NAME) in a container's command: the Kubeflow operator's
# MASTER_ADDR/MASTER_PORT, or a variable of the container's own env (an id).
K8S_SAMPLE_VALUES = {"MASTER_ADDR": "mnist-ddp-pj-master-0", "MASTER_PORT": "29400"}


def _expand(arg: str) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: K8S_SAMPLE_VALUES.get(m[1], f"sample-{m[1].lower()}"), arg)


def _parse_cli(cmd: list[str]):
    """`mnistops ...` through the real command line parser, with Kubernetes' $(VAR) references expanded
    as the kubelet would: unknown commands or options, and values out of range, fail here."""
    from flows.cli import build_parser

    assert cmd[0] == "mnistops", cmd
    try:
        return build_parser().parse_args([_expand(a) for a in cmd[1:]])
    except SystemExit as e:
        raise AssertionError(f"the mnistops CLI refuses {shlex.join(cmd)} (exit {e.code})") from None


def _check_train_command(cmd: list[str], nodes: int) -> str:
    assert cmd[:2] == ["mnistops", "train"], cmd
    args = _parse_cli(cmd)
    assert args.nnodes == nodes, f"--nnodes must equal the {nodes} pods"
    assert args.max_restarts >= 1
    assert args.rdzv_id
    return _option(cmd, "--rdzv-endpoint")


def _check_gpu_and_secrets(container: dict) -> None:
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any("secretRef" in e for e in container.get("envFrom", [])), "MLflow credentials come from a Secret"
    assert not any(CREDENTIAL_KEY.search(e["name"]) and "value" in e for e in container.get("env", []))


def test_indexed_job_rendezvous_through_its_headless_service():
    docs = dict((d["kind"], d) for f, d in _k8s_docs() if f == "ddp-indexed-job.yaml")
    job, svc = docs["Job"], docs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == svc["metadata"]["name"]
    (container,) = pod["containers"]
    endpoint = _check_train_command(container["command"], spec["completions"])
    host, port = endpoint.rsplit(":", 1)
    # Pod 0's DNS name under the headless service: <job>-0.<service>.
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    # $(JOB_UID) expands only from a variable declared in the container itself.
    assert _option(container["command"], "--rdzv-id") == "$(JOB_UID)"
    assert "JOB_UID" in {e["name"] for e in container["env"]}
    _check_gpu_and_secrets(container)


def test_pytorchjob_uses_the_operators_master_address():
    (job,) = [d for _, d in _k8s_docs() if d["kind"] == "PyTorchJob"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nodes = sum(r["replicas"] for r in replicas.values())
    for container in _containers(job):
        assert container["name"] == "pytorch", "the operator sets MASTER_ADDR only in the container named pytorch"
        endpoint = _check_train_command(container["command"], nodes)
        assert endpoint == "$(MASTER_ADDR):$(MASTER_PORT)"
        # One id per submission (generateName), read from the operator's label: never a fixed id.
        assert job["metadata"].get("generateName") and "name" not in job["metadata"]
        assert _option(container["command"], "--rdzv-id") == "$(JOB_NAME)"
        (env,) = [e for e in container["env"] if e["name"] == "JOB_NAME"]
        assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['training.kubeflow.org/job-name']"
        assert "pytorchjob-port" in {p["name"] for p in container["ports"]}
        _check_gpu_and_secrets(container)


def test_k8s_volumes_and_worker_pool_exist():
    docs = _k8s_docs()
    claims = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    for file, d in docs:
        spec = d.get("spec", {})
        templates = ([r["template"] for r in spec["pytorchReplicaSpecs"].values()] if d["kind"] == "PyTorchJob"
                     else [spec["template"]] if "template" in spec else [])
        for t in templates:
            for v in t["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{file}: unknown PVC"
        for c in _containers(d):
            if c["command"][:3] == ["prefect", "worker", "start"]:
                assert _option(c["command"], "--pool") in pools
                assert _pull_step_variable() in {e["name"] for e in c.get("env", [])}


# ------------------------------------------------------------------------------------------- Prefect


def test_prefect_yaml_loads_with_prefects_own_model():
    _needs("prefect", "prefect")
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    assert {d.name for d in model.deployments} >= set(EXPECTED_DEPLOYMENTS)


def _pull_step_variable() -> str:
    """The environment variable whose folder the flow runs work in (read on the worker)."""
    (step,) = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    m = re.fullmatch(r"\{\{\s*\$([A-Z_][A-Z0-9_]*)\s*\}\}", directory)
    assert m, f"the pull step's directory {directory!r} is not one environment variable"
    return m.group(1)


def test_prefect_deployments_schedules_and_pools():
    config = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    for name, (entrypoint, cron) in EXPECTED_DEPLOYMENTS.items():
        assert deployments[name]["entrypoint"] == entrypoint
        assert [s["cron"] for s in deployments[name]["schedules"]] == [cron]
    compose_worker = _compose()["services"]["worker"]
    for d in deployments.values():
        assert d["work_pool"]["name"] == _option(compose_worker["command"], "--pool")
    # The folder the pull step changes into: the compose worker sets it, on a volume.
    variable = _pull_step_variable()
    home = compose_worker["environment"][variable]
    assert home in {v.split(":")[1] for v in compose_worker["volumes"]}


def test_compose_dataset_cache_is_on_a_named_volume():
    services, volumes = _compose()["services"], set(_compose()["volumes"])
    for name in ("worker", "trainer"):
        svc = services[name]
        mounts = dict(reversed(v.split(":")[:2]) for v in svc["volumes"])  # container path -> volume
        cache = svc["environment"]["MNISTOPS_DATA_DIR"]
        assert mounts.get(cache) in volumes, f"{name}: the dataset cache {cache} is not on a named volume"


def test_prefect_crons_are_valid():
    _needs("prefect", "prefect")
    from prefect.client.schemas.schedules import CronSchedule  # Prefect's own cron validation

    crons = [s for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] for s in d.get("schedules") or []]
    assert crons
    for s in crons:
        CronSchedule(cron=s["cron"], timezone=s.get("timezone"))


@pytest.mark.parametrize("entrypoint", sorted({d["entrypoint"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}))
def test_prefect_entrypoints_import_as_flows(entrypoint):
    _needs("prefect", "prefect")
    from prefect import Flow
    from prefect.utilities.importtools import import_object  # what the worker's flow-run process uses

    assert isinstance(import_object(entrypoint), Flow)


# ---------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist(path):
    # The training image cannot be built here (6.7 GB); what it copies must at least exist. The
    # inference image's steps run for real in tests/test_infra_images.py.
    copies = [i.rest for i in instructions(path) if i.word in {"COPY", "ADD"}]
    assert copies
    for rest in copies:
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(rest)), "no multi-stage copies expected"
        for src in args[:-1]:
            # The build context is the repository root (see infra/docker/README).
            assert (ROOT / src).exists(), f"{path.name}: COPY source {src} does not exist"


# ---------------------------------------------------------------------------------------------- docs


def _readme_mnistops_commands() -> list[list[str]]:
    readme = (INFRA / "README.md").read_text()
    return [shlex.split(line, comments=True) for line in readme.splitlines() if re.match(r"^ {4}mnistops\s", line)] + \
        [shlex.split(m) for m in re.findall(r"`(mnistops [^`]*)`", readme)]


def test_every_mnistops_command_in_infra_parses_with_the_real_cli():
    commands = _readme_mnistops_commands()
    assert commands, "infra/README.md shows no mnistops command"
    for service in _compose()["services"].values():
        cmd = service.get("command")
        if isinstance(cmd, list) and cmd[:1] == ["mnistops"]:
            commands.append(cmd)
    for _, d in _k8s_docs():
        for c in _containers(d):
            if c["command"][:1] == ["mnistops"]:
                commands.append(c["command"])
    for cmd in commands:
        if cmd[1:2] != ["--help"]:
            _parse_cli(cmd)


def test_infra_readme_names_real_files():
    readme = (INFRA / "README.md").read_text()
    for flag_path in re.findall(r"(?:-f|--prefect-file|--env-file)\s+(infra/\S+)", readme):
        if flag_path != "infra/.env":  # the user's own copy of .env.example
            assert (ROOT / flag_path).exists(), flag_path
    for test_file in re.findall(r"`(tests/test_\w+\.py)`", readme):
        assert (ROOT / test_file).is_file(), test_file
