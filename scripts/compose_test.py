"""`make compose-test`: build the Docker images, run the compose stack for real, exercise it.

Needs Docker (engine + compose plugin) and minutes; not part of `make test`. Works on a host
without registry access: when the public base image cannot be pulled, it builds a Debian
bookworm base locally (debootstrap + `docker import`, needs root) and adds
docker/compose.offline.yml, which swaps only base images (Redis, PostgreSQL and moto's S3
server from Debian's and PyPI's packages). docker-compose.yml itself is never changed.

Steps, each printed with its time; the first failure tears the stack down and exits 1:

  preflight       docker engine and compose plugin answer
  base images     public bases pulled, or local ones built (and a local CPU torch wheel
                  linked into docker/wheels/ when the PyTorch index is out of reach)
  compose config  `docker compose config` is clean for the files in use
  build           the project image (once) and the service images; sizes reported
  up              Redis, PostgreSQL, S3, set-up jobs, gateway and two workers, all healthy
  non-root        gateway and workers run as an unprivileged user
  samples         the one-shot job registered `upper` and `json`
  admin upload    `lorapool-admin --target ... upload` through the gateway, twice: same version
  generate        base model, `upper` and the uploaded adapter through the published port
  scale           --scale worker=3
  kill mid-stream `docker kill` of the replica streaming a reply (what `docker compose kill`
                  does, for one replica): the client gets UNAVAILABLE "worker lost after N
                  tokens; retry"; `up --scale worker=3` brings it back; the next request works
  crash mid-stream  SIGKILL of a streaming worker's process: same status, and the restart
                  policy brings the replica back by itself; the next request works
  down            containers, network and volumes removed

Options: --keep leaves the stack up (then: docker compose -p lorapool-compose-test ... down -v);
--base public|local forces a base; LORAPOOL_DEBIAN_MIRROR, LORAPOOL_TORCH_WHEEL and
LORAPOOL_HOST_CA override what the offline path finds on the host.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "lorapool-compose-test"
PUBLIC_BASE = "python:3.11-slim-bookworm"
LOCAL_DEBIAN = "lorapool-local/debian:bookworm"
LOCAL_PYTHON = "lorapool-local/python:3.11-bookworm"
PROJECT_IMAGE = "lorapool/lorapool:0.1.0-cpu"
LOCAL_SERVICE_IMAGES = (
    "lorapool-local/redis:7.0-bookworm",
    "lorapool-local/postgres:15-bookworm",
    "lorapool-local/moto-s3:5.2.5",
)
IMAGE_LABEL = "org.opencontainers.image.title=lorapool"
PROMPT = "Name three colors."
LOST = re.compile(r"worker lost after (\d+) tokens; retry")
METRICS_SNIPPET = (
    "import urllib.request as u;"
    "t=u.urlopen('http://127.0.0.1:9100/metrics',timeout=3).read().decode();"
    "print([l.split()[1] for l in t.splitlines() if l.startswith('lorapool_worker_active_jobs ')][0])"
)
KILL_SNIPPET = (
    "import os,signal,pathlib;"
    "[os.kill(int(p.parent.name),signal.SIGKILL) for p in pathlib.Path('/proc').glob('[0-9]*/cmdline')"
    " if p.parent.name not in ('1',str(os.getpid())) and b'lorapool-worker' in p.read_bytes()]"
)


class Failed(Exception):
    """A step failed; the message says what was expected and what happened."""


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class Report:
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        say(f"==> {name}")
        t0 = time.monotonic()
        try:
            yield
        except Failed:
            self.steps.append((name, time.monotonic() - t0, "FAILED"))
            raise
        self.steps.append((name, time.monotonic() - t0, "ok"))
        say(f"    {name}: ok ({time.monotonic() - t0:.1f} s)")

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"    {text}")

    def summary(self) -> None:
        say("\nstep                      time     result")
        for name, seconds, result in self.steps:
            say(f"{name:<25} {seconds:7.1f} s  {result}")
        say(f"{'total':<25} {sum(s for _, s, _ in self.steps):7.1f} s")
        for line in self.notes:
            say(f"- {line}")


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 900, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise Failed(f"`{' '.join(cmd[:6])} ...` exited {proc.returncode}:\n{tail}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    files: list[str]
    env: dict[str, str]
    port: int
    api_token: str
    admin_token: str

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        cmd = ["docker", "compose", "--ansi", "never", "-p", PROJECT]
        for f in self.files:
            cmd += ["-f", f]
        return run([*cmd, *args], env=self.env, timeout=timeout, check=check).stdout

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def new_stack(offline: bool) -> Stack:
    port = free_port()
    api, admin = secrets.token_hex(16), secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        LORAPOOL_API_TOKENS=api, LORAPOOL_ADMIN_TOKENS=admin, LORAPOOL_PUBLISH=f"127.0.0.1:{port}"
    )
    files = ["docker-compose.yml"]
    files += ["docker/compose.offline.yml"] if offline else []
    files += ["docker/compose.test.yml"]
    return Stack(files, env, port, api, admin)


# ---- base images -------------------------------------------------------------------------


def have_image(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False).returncode == 0


def can_pull(name: str) -> bool:
    return (
        have_image(name) or run(["docker", "pull", name], check=False, timeout=300).returncode == 0
    )


def debian_mirror() -> str:
    if os.environ.get("LORAPOOL_DEBIAN_MIRROR"):
        return os.environ["LORAPOOL_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for match in re.finditer(
            r"^(?:URIs:|deb(?:\s+\[[^]]*\])?)\s+(\S+/debian)/?\s*$", text, re.M
        ):
            return match.group(1)
        for match in re.finditer(
            r"^deb(?:\s+\[[^]]*\])?\s+(\S+/debian)/?\s+bookworm\b", text, re.M
        ):
            return match.group(1)
    return "http://deb.debian.org/debian"


def build_local_debian(report: Report) -> None:
    if shutil.which("debootstrap") is None:
        raise Failed("no registry access and no debootstrap: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise Failed("debootstrap needs root to build the local Debian base image")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="lorapool-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=1200)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["bash"]', "-", LOCAL_DEBIAN],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise Failed(f"docker import failed: {imported.stderr.strip()}")
    report.note(f"built {LOCAL_DEBIAN} with debootstrap from {mirror}")


def host_ca_bundle() -> Path:
    for candidate in (
        os.environ.get("LORAPOOL_HOST_CA"),
        os.environ.get("PIP_CERT"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise Failed("no CA bundle found for pip inside the build (set LORAPOOL_HOST_CA)")


def build_local_python(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="lorapool-base-") as tmp:
        shutil.copyfile(host_ca_bundle(), Path(tmp) / "host-ca.crt")
        run(
            [
                "docker",
                "build",
                "-f",
                str(ROOT / "docker/base/Dockerfile"),
                "-t",
                LOCAL_PYTHON,
                tmp,
            ],
            timeout=1200,
        )
    report.note(f"built {LOCAL_PYTHON} from docker/base/Dockerfile")


def torch_version() -> str:
    text = (ROOT / "docker/Dockerfile.cpu").read_text()
    match = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M)
    if match is None:
        raise Failed("docker/Dockerfile.cpu has no ARG TORCH_VERSION")
    return match.group(1)


def find_links() -> list[str]:
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    listing = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    dirs += re.findall(r"find-links='([^']+)'", listing)
    return [d for d in dirs if Path(d).is_dir()]


def link_torch_wheel(report: Report) -> None:
    """Offline builds cannot reach the PyTorch index: hand the build a local CPU wheel."""
    version = torch_version()
    wheels = ROOT / "docker/wheels"
    if list(wheels.glob(f"torch-{version}[+-]*.whl")):
        return
    given = os.environ.get("LORAPOOL_TORCH_WHEEL")
    found = [Path(given)] if given else []
    for directory in find_links():
        found += sorted(Path(directory).glob(f"torch-{version}+cpu-cp311-*.whl"))
    if not found:
        report.note(f"no local torch {version} CPU wheel: the build will try the PyTorch index")
        return
    dest = wheels / found[0].name
    try:
        os.link(found[0], dest)
    except OSError:
        shutil.copyfile(found[0], dest)
    report.note(f"torch wheel for the build: {found[0]} -> docker/wheels/")


def prepare_bases(report: Report, base: str) -> bool:
    """True when the stack must use the offline override (local base images)."""
    if base != "local" and can_pull(PUBLIC_BASE):
        report.note(f"public base {PUBLIC_BASE} available: building on it")
        return False
    if base == "public":
        raise Failed(f"cannot pull {PUBLIC_BASE}")
    report.note(f"{PUBLIC_BASE} cannot be pulled: using local base images")
    if not have_image(LOCAL_DEBIAN):
        build_local_debian(report)
    if not have_image(LOCAL_PYTHON):
        build_local_python(report)
    link_torch_wheel(report)
    return True


# ---- checks against the running stack -----------------------------------------------------


def check_config(stack: Stack) -> None:
    cmd = ["docker", "compose", "-p", PROJECT]
    for files in (stack.files[:1], stack.files):
        args = [a for f in files for a in ("-f", f)]
        proc = run([*cmd, *args, "config", "-q"], env=stack.env)
        if proc.stderr.strip():
            raise Failed(f"`docker compose {' '.join(args)} config` warns:\n{proc.stderr}")


def image_sizes(report: Report, images: list[str]) -> None:
    for image in images:
        size = run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout.strip()
        report.note(f"image {image}: {int(size) / 1e9:.2f} GB")


def check_non_root(stack: Stack, report: Report) -> None:
    for service in ("gateway", "worker", "redis", "postgres", "minio"):
        for cid in stack.containers(service):
            uid = run(["docker", "exec", cid, "id", "-u"]).stdout.strip()
            if service in ("gateway", "worker") and uid == "0":
                raise Failed(f"{service} container {cid[:12]} runs as root")
            if uid == "0":
                report.note(f"{service} runs as root (a public image's own default)")
    report.note("gateway and worker containers run as uid 10001")


def wait_healthy(cid: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = run(
            ["docker", "inspect", "-f", "{{.State.Status}}/{{.State.Health.Status}}", cid],
            check=False,
        ).stdout.strip()
        if state == "running/healthy":
            return
        time.sleep(2)
    raise Failed(f"container {cid[:12]} not healthy after {timeout:.0f} s (last: {state})")


def restart_count(cid: str) -> int:
    return int(run(["docker", "inspect", "-f", "{{.RestartCount}}", cid]).stdout.strip())


# ---- gRPC through the published port ------------------------------------------------------


def list_adapters(stack: Stack) -> set[str]:
    import grpc

    from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc

    try:
        with grpc.insecure_channel(stack.target) as channel:
            reply = generation_pb2_grpc.GenerationStub(channel).ListAdapters(
                generation_pb2.ListAdaptersRequest(),
                metadata=[("authorization", f"Bearer {stack.api_token}")],
                timeout=30,
            )
    except grpc.RpcError as exc:
        raise Failed(f"ListAdapters: {exc.code().name}: {exc.details()}") from exc  # type: ignore[attr-defined]
    return {f"{a.name}:{a.version}" for a in reply.adapters}


# What `lorapool-admin` says when it has no remote mode (yet): then Admin.Upload by hand.
NO_REMOTE_ADMIN = ("unrecognized arguments: --target", "--target needs the lorapool package")


def upload_with_admin_cli(stack: Stack, directory: Path, name: str) -> str | None:
    """`lorapool-admin --target ... upload`; None when this checkout's CLI has no --target."""
    admin = Path(sys.executable).parent / "lorapool-admin"
    cmd = [str(admin), "--target", stack.target, "--token", stack.admin_token]
    proc = run([*cmd, "upload", str(directory), "--name", name], timeout=300, check=False)
    if proc.returncode != 0 and any(m in proc.stderr for m in NO_REMOTE_ADMIN):
        return None
    if proc.returncode != 0:
        raise Failed(f"lorapool-admin --target upload exited {proc.returncode}: {proc.stderr}")
    match = re.search(rf"\b{re.escape(name)}:(\d+)\b", proc.stdout)
    if match is None:
        raise Failed(f"lorapool-admin upload printed no {name}:VERSION: {proc.stdout!r}")
    return match.group(0)


def upload(stack: Stack, directory: Path, name: str, report: Report) -> str:
    ref = upload_with_admin_cli(stack, directory, name)
    if ref is not None:
        report.note(f"lorapool-admin --target upload {directory.name} --name {name}: {ref}")
        return ref
    ref = upload_with_grpc(stack, directory, name)
    report.note(f"lorapool-admin has no --target here: Admin.Upload by gRPC gave {ref}")
    return ref


def upload_with_grpc(stack: Stack, directory: Path, name: str) -> str:
    """Admin.Upload by hand (what `lorapool-admin --target` does), for older checkouts."""
    import io
    import tarfile

    import grpc

    from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    data = buffer.getvalue()
    chunks = [admin_pb2.UploadChunk(header=admin_pb2.UploadHeader(name=name))]
    chunks += [
        admin_pb2.UploadChunk(data=data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)
    ]
    metadata = [("authorization", f"Bearer {stack.admin_token}")]
    try:
        with grpc.insecure_channel(stack.target) as channel:
            info = admin_pb2_grpc.AdminStub(channel).Upload(
                iter(chunks), metadata=metadata, timeout=300
            )
    except grpc.RpcError as exc:
        raise Failed(f"Admin.Upload: {exc.code().name}: {exc.details()}") from exc  # type: ignore[attr-defined]
    return f"{info.name}:{info.version}"


def generate(stack: Stack, adapter: str, report: Report) -> str:
    cli = Path(sys.executable).parent / "lorapool"
    cmd = [str(cli), "generate", "--target", stack.target, "--token", stack.api_token]
    cmd += ["--adapter", adapter, "--max-tokens", "64", "--timeout", "300", PROMPT]
    for attempt in (1, 2):
        proc = run(cmd, check=False, timeout=330)
        if proc.returncode == 0:
            return proc.stdout.strip()
        if attempt == 1 and "UNAVAILABLE" in proc.stderr:
            report.note(f"generate {adapter or 'base'}: {proc.stderr.strip()} -> retried once")
            continue
        raise Failed(
            f"lorapool generate --adapter {adapter!r} exited {proc.returncode}: {proc.stderr}"
        )
    raise AssertionError("unreachable")


@dataclass
class Stream:
    """One long greedy generation, read on a thread: tokens so far and how it ended."""

    tokens: int = 0
    code: str = ""
    details: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def read(self, stack: Stack) -> None:
        import grpc

        from protos.lorapool.v1 import generation_pb2 as pb
        from protos.lorapool.v1 import generation_pb2_grpc as rpc

        request = pb.GenerateRequest(
            sampling=pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        )
        request.chat.messages.add(role="user", content="Tell me a long story about the sea.")
        metadata = [("authorization", f"Bearer {stack.api_token}")]
        try:
            with grpc.insecure_channel(stack.target) as channel:
                for event in rpc.GenerationStub(channel).Generate(
                    request, metadata=metadata, timeout=600
                ):
                    if event.HasField("delta"):
                        self.tokens += len(event.delta.token_ids)
            self.code = "OK"
        except grpc.RpcError as exc:
            self.code = exc.code().name  # type: ignore[attr-defined]
            self.details = exc.details() or ""  # type: ignore[attr-defined]
        finally:
            self.done.set()


def busy_worker(stack: Stack) -> str:
    """The worker container running a job (its active-jobs gauge), polled for 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for cid in stack.containers("worker"):
            proc = run(["docker", "exec", cid, "python", "-c", METRICS_SNIPPET], check=False)
            if proc.returncode == 0 and float(proc.stdout.strip() or 0) > 0:
                return cid
        time.sleep(0.5)
    raise Failed("no worker reports an active job")


def kill_mid_stream(stack: Stack, report: Report, kill: Callable[[str], None]) -> str:
    """Start a long stream, kill the worker serving it once tokens flowed; check the status."""
    stream = Stream()
    threading.Thread(target=stream.read, args=(stack,), daemon=True).start()
    deadline = time.monotonic() + 300
    while stream.tokens < 3 and not stream.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    if stream.tokens < 3:
        raise Failed(
            f"the long stream produced {stream.tokens} tokens ({stream.code} {stream.details})"
        )
    cid = busy_worker(stack)
    kill(cid)
    killed_after = stream.tokens
    if not stream.done.wait(120):
        raise Failed("the stream did not end within 120 s of the kill")
    match = LOST.search(stream.details)
    if stream.code == "UNAVAILABLE" and match:
        report.note(
            f"killed {cid[:12]} after >= {killed_after} tokens: UNAVAILABLE {stream.details!r} "
            f"(client received {stream.tokens} tokens)"
        )
        if int(match.group(1)) != stream.tokens:
            raise Failed(
                f"status says {match.group(1)} tokens, the client received {stream.tokens}"
            )
        return cid
    raise Failed(
        f"expected UNAVAILABLE 'worker lost after N tokens; retry', got {stream.code} {stream.details!r}"
    )


# ---- the run ------------------------------------------------------------------------------


def check_outputs(outputs: dict[str, str]) -> None:
    if not outputs[""]:
        raise Failed("the base model answered nothing")
    upper = outputs["upper"]
    if not any(c.isalpha() for c in upper) or upper != upper.upper():
        raise Failed(f"`upper` did not answer in upper case: {upper!r}")
    uploaded = outputs["json-gw"]
    if not uploaded.startswith('{"answer"'):
        raise Failed(f"the uploaded json adapter did not answer with a JSON object: {uploaded!r}")


def exercise(stack: Stack, report: Report) -> None:
    with report.step("non-root"):
        check_non_root(stack, report)
    with report.step("samples"):
        names = list_adapters(stack)
        if not {"upper:1", "json:1"} <= names:
            raise Failed(f"the samples job did not register upper and json: {sorted(names)}")
        report.note(f"adapters after `up`: {sorted(names)}")
    with report.step("admin upload"):
        refs = [upload(stack, ROOT / "samples/adapters/json", "json-gw", report) for _ in range(2)]
        if refs[0] != refs[1]:
            raise Failed(f"uploading identical bytes twice gave {refs}, not one version")
        report.note(f"uploaded samples/adapters/json as {refs[0]} twice: same version")
    with report.step("generate"):
        outputs = {
            adapter: generate(stack, adapter, report) for adapter in ("", "upper", "json-gw")
        }
        for adapter, text in outputs.items():
            report.note(f"{adapter or 'base'}: {text[:90]!r}")
        check_outputs(outputs)
    with report.step("scale to 3 workers"):
        stack.compose("up", "-d", "--wait", "--no-deps", "--scale", "worker=3", "worker")
        if len(stack.containers("worker")) != 3:
            raise Failed(f"expected 3 workers, have {len(stack.containers('worker'))}")
    with report.step("kill mid-stream"):
        kill_mid_stream(stack, report, docker_kill)
        stack.compose("up", "-d", "--wait", "--no-deps", "--scale", "worker=3", "worker")
        for cid in stack.containers("worker"):
            wait_healthy(cid)
        report.note("`up --scale worker=3` brought the killed replica back")
        generate(stack, "upper", report)
    with report.step("crash mid-stream"):
        before = {cid: restart_count(cid) for cid in stack.containers("worker")}

        def crash(cid: str) -> None:
            # The exec session ends with the container (exit 137): the restart shows it worked.
            run(["docker", "exec", cid, "python", "-c", KILL_SNIPPET], check=False)

        cid = kill_mid_stream(stack, report, crash)
        wait_healthy(cid)
        if restart_count(cid) != before[cid] + 1:
            raise Failed(f"{cid[:12]} was not restarted by its restart policy")
        report.note(f"restart policy restarted {cid[:12]} (RestartCount {restart_count(cid)})")
        generate(stack, "", report)


def docker_kill(cid: str) -> None:
    """`docker compose kill worker`, for one replica: SIGKILL through the engine."""
    run(["docker", "kill", cid])


def build(stack: Stack, report: Report) -> None:
    """The project image once (every lorapool service names it) and the service images."""
    offline = "docker/compose.offline.yml" in stack.files
    services = ["redis", "postgres", "minio", "migrate"] if offline else ["migrate"]
    stack.compose("build", *services, timeout=3600)
    run(["docker", "image", "prune", "-f", "--filter", f"label={IMAGE_LABEL}"])
    images = [PROJECT_IMAGE, *([LOCAL_PYTHON, *LOCAL_SERVICE_IMAGES] if offline else [])]
    image_sizes(report, images)


def tear_down(stack: Stack, report: Report) -> None:
    with report.step("down"):
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=300)
        left = run(
            [
                "docker",
                "volume",
                "ls",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
            ]
        ).stdout.split()
        if left:
            raise Failed(f"volumes left behind: {left}")


def dump_state(stack: Stack) -> None:
    say(stack.compose("ps", "-a", check=False))
    say(stack.compose("logs", "--no-color", "--tail", "40", check=False, timeout=120))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    parser.add_argument("--base", choices=("auto", "public", "local"), default="auto")
    args = parser.parse_args(argv)
    report = Report()
    stack: Stack | None = None
    up = False
    try:
        with report.step("preflight"):
            run(["docker", "info", "--format", "{{.ServerVersion}}"])
            report.note(
                "compose: " + run(["docker", "compose", "version", "--short"]).stdout.strip()
            )
        with report.step("base images"):
            stack = new_stack(prepare_bases(report, args.base))
        stack.compose("down", "-v", "--remove-orphans", check=False)  # a previous run's leftovers
        with report.step("compose config"):
            check_config(stack)
        with report.step("build"):
            build(stack, report)
        with report.step("up (2 workers)"):
            up = True
            stack.compose("up", "-d", "--wait", "--scale", "worker=2", timeout=900)
        exercise(stack, report)
        if not args.keep:
            tear_down(stack, report)
            up = False
    except (Failed, subprocess.TimeoutExpired) as exc:
        say(f"\nFAILED: {exc}")
        if stack is not None and up:
            dump_state(stack)
        report.summary()
        return 1
    finally:
        if stack is not None and up and not args.keep:
            stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
    report.summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
