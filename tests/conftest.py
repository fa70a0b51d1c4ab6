"""Fixtures shared by every test folder: a local S3 server (moto) for s3:// storage.

    def test_store_on_s3(s3_server):
        fs = fsspec.filesystem("s3", **s3_server.storage_options)
        fs.pipe(s3_server.url("x.bin"), b"...")

    def test_subprocess_on_s3(s3_env):        # AWS_* variables set, so plain
        fsspec.open(s3_env.url("x.bin"))      # s3:// URLs (fsspec, DVC, boto3) reach moto

Each test gets a fresh, empty bucket on one moto server per session, bound to
127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# `make test` runs two pytest workers (pytest-xdist) on this 2-core machine. Each worker,
# and every stage process its tests start, keeps to one BLAS / OpenMP thread, set before
# torch is imported: two processes of two spinning OpenMP threads each on two cores run
# several times slower than one thread each (measured: LM training 3.2 -> 0.5 steps/s).
# Tests that need another count set it themselves (torch.set_num_threads); a test that
# compares bytes compares runs made under the same setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


# The test modules that read the session's tiny pipeline (tests/backbone/conftest.py
# `tiny_pipeline`, ~6 min to build): one worker runs them all, so it is built once.
SHARED_PIPELINE = ("tests/backbone/test_kill_e2e.py", "tests/backbone/test_pipeline_e2e.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler with every test its own unit of work, except the modules
    of SHARED_PIPELINE, which are one unit (the largest, so it is sent first). xdist's
    own `--dist loadgroup` does not group under pytest 9: it renames `item._nodeid`,
    which pytest 9's node ids no longer read."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedPipelineScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tiny_pipeline" if nodeid.split("::", 1)[0] in SHARED_PIPELINE else nodeid

    return SharedPipelineScheduling(config, log)


@dataclass(frozen=True)
class S3:
    """Where a test's bucket lives and how to reach it."""

    endpoint_url: str
    bucket: str
    no_aws_files: str  # an empty file, standing in for ~/.aws/config and credentials
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}"

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for `fsspec.filesystem("s3", ...)` / `s3fs.S3FileSystem`."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment for processes (DVC, boto3, s3fs) that should reach this server and
        nothing else: credentials, region, endpoint, and no ~/.aws files."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_CONFIG_FILE": self.no_aws_files,
            "AWS_SHARED_CREDENTIALS_FILE": self.no_aws_files,
        }


@pytest.fixture(scope="session")
def _moto(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(endpoint URL, empty AWS config file) of one moto S3 server for the session."""
    from moto.server import ThreadedMotoServer

    empty = tmp_path_factory.mktemp("aws") / "empty"  # DVC refuses os.devnull here
    empty.touch()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}", str(empty)
    server.stop()


@pytest.fixture
def s3_server(_moto: tuple[str, str]) -> S3:
    """A fresh, empty bucket on a local S3 server (moto, 127.0.0.1)."""
    import boto3

    s3 = S3(endpoint_url=_moto[0], bucket=f"atlas-{uuid.uuid4().hex[:12]}", no_aws_files=_moto[1])
    boto3.client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
        aws_access_key_id=s3.key, aws_secret_access_key=s3.secret,
    ).create_bucket(Bucket=s3.bucket)  # fmt: skip
    return s3


@pytest.fixture
def s3_env(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """`s3_server` with its AWS_* variables set in this process (and its children)."""
    import s3fs

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients keep their old endpoint
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test (the machine is shared; exact-value
    tests need one thread count), restored afterwards. Packages whose tests all want it
    request it from an autouse fixture in their conftest."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
