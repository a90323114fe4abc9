"""Build docker/Dockerfile.cpu with Podman and run it: /health and one chat completion from
inside the container. No registry is reachable here, so the base image is a Debian minbase made
with debootstrap and imported into Podman, passed as the BASE_IMAGE build argument."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.tools import tool

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

BASE = "localhost/slime-base:bookworm"
IMAGE = "localhost/slime-serve:cpu-test"
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]


def sh(*args, timeout=900, check=True):
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(args[:4])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def base_image(tmp_path_factory):
    podman = tool("podman", "the Debian packages podman buildah runc")
    if sh(podman, "image", "exists", BASE, check=False).returncode == 0:
        return BASE
    debootstrap = tool("debootstrap", "the Debian package debootstrap")
    root = tmp_path_factory.mktemp("base") / "root"
    sh(debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(root),
       "http://deb.debian.org/debian", timeout=1200)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([podman, "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    tar.wait()
    return BASE


@pytest.fixture(scope="module")
def image(repo, base_image):
    podman = tool("podman", "the Debian packages podman buildah runc")
    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
    build_args = ["--build-arg", f"BASE_IMAGE={base_image}"]
    if wheels:  # offline torch: the local CPU wheel goes into the build context
        shutil.copy(wheels[0], repo / "docker" / "wheels" / wheels[0].name)
        build_args += ["--build-arg", "TORCH_PIP_ARGS=--no-index"]
    # This machine's TLS goes through a local CA: RUN steps see the host's bundle.
    volumes = ["-v", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"]
    try:
        sh(podman, "build", *RUNTIME, *ULIMITS, *volumes, "--format", "docker", "-f", str(repo / "docker/Dockerfile.cpu"),
           *build_args, "-t", IMAGE, str(repo), timeout=1800)
    finally:
        for w in (repo / "docker" / "wheels").glob("*.whl"):
            w.unlink()
    return IMAGE


def test_cpu_image_serves_health_and_a_chat_completion(image):
    podman = tool("podman", "the Debian packages podman buildah runc")
    name = f"slime-test-{int(time.time())}"
    sh(podman, "run", *RUNTIME, *ULIMITS, "-d", "--name", name, image)
    try:
        probe = ("import json, time, urllib.request\n"
                 "for _ in range(120):\n"
                 "    try:\n"
                 "        urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2); break\n"
                 "    except Exception: time.sleep(0.5)\n"
                 "health = json.load(urllib.request.urlopen('http://127.0.0.1:8000/health'))\n"
                 "body = json.dumps({'model': 'tiny-slime', 'max_tokens': 4, 'temperature': 0,\n"
                 "                   'messages': [{'role': 'user', 'content': 'hi'}]}).encode()\n"
                 "req = urllib.request.Request('http://127.0.0.1:8000/v1/chat/completions', data=body,\n"
                 "                             headers={'Content-Type': 'application/json'})\n"
                 "chat = json.load(urllib.request.urlopen(req))\n"
                 # an image request: slicing (the compiled bicubic resize, model.pillow_bicubic) and the vision stage
                 "import base64, io, os\n"
                 "from PIL import Image\n"
                 "buf = io.BytesIO(); Image.new('RGB', (700, 500), (200, 30, 90)).save(buf, 'PNG')\n"
                 "url = 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()\n"
                 "body = json.dumps({'model': 'tiny-slime', 'max_tokens': 3, 'temperature': 0,\n"
                 "                   'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'what?'},\n"
                 "                                {'type': 'image_url', 'image_url': {'url': url}}]}]}).encode()\n"
                 "req = urllib.request.Request('http://127.0.0.1:8000/v1/chat/completions', data=body,\n"
                 "                             headers={'Content-Type': 'application/json'})\n"
                 "image_chat = json.load(urllib.request.urlopen(req))\n"
                 "procs = [open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()]\n"
                 "engines = sum(b'multiprocessing' in c and b'resource_tracker' not in c for c in procs)\n"
                 "kernels = [f for _, _, fs in os.walk(os.environ['NUMBA_CACHE_DIR']) for f in fs]\n"
                 "print(json.dumps({'health': health, 'chat': chat, 'image_chat': image_chat,\n"
                 "                  'engine_processes': engines, 'numba_cache': kernels}))\n")
        out = sh(podman, "exec", name, "python", "-c", probe, timeout=120)
        data = json.loads(out.stdout.strip().splitlines()[-1])
        assert data["health"] == {"status": "ok"}
        assert data["chat"]["object"] == "chat.completion" and data["chat"]["usage"]["completion_tokens"] == 4
        # 700 x 500 -> 2 tiles: 576 global + up to 288 local tokens in the prompt
        assert data["image_chat"]["usage"]["completion_tokens"] == 3
        assert data["image_chat"]["usage"]["prompt_tokens"] > 576
        assert data["engine_processes"] == 1  # the CPU image runs the engine in its own process
        for kernel in ("pillow_bicubic.", "paged_attention_cpu."):  # the bicubic resize, the decode attention
            assert any(f.startswith(kernel) and f.endswith(".nbc") for f in data["numba_cache"]), \
                f"the {kernel[:-1]} kernels were not compiled into the image"
        uid = sh(podman, "exec", name, "id", "-u").stdout.strip()
        assert uid == "10001"  # non-root
        inspect = json.loads(sh(podman, "inspect", image).stdout)[0]
        healthcheck = inspect.get("Healthcheck") or inspect["Config"].get("Healthcheck")
        assert "/health" in healthcheck["Test"][-1]
        # SIGTERM reaches the server (exec-form entrypoint): it drains and exits 0
        sh(podman, "stop", "-t", "40", name, timeout=60)
        state = json.loads(sh(podman, "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
    finally:
        sh(podman, "rm", "-f", name, check=False)
