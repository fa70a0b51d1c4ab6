"""S3 storage, locally: fsspec on the `s3_server` fixture, and a DVC S3 remote.

The DVC test uses README "Scaling out / shared servers" commands verbatim: `dvc remote
add -d`, `dvc remote modify ... endpointurl`, `--local` credentials, `dvc push`, `dvc pull`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

MAKE = """\
import random, sys
from pathlib import Path

rng = random.Random(0)
for name in ("blocks.0.hook_resid_post/c/0/0", "blocks.0.hook_resid_post/c/1/0", "zarr.json"):
    p = Path("out/store") / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(rng.randbytes(20_000))
Path("out/metrics.json").write_text('{"rows": 3}')
"""


def test_fsspec_reads_and_writes_on_the_s3_server(s3_server):
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    data = os.urandom(70_000)
    fs.pipe(s3_server.url("acts/shard-0.bin"), data)
    assert fs.cat(s3_server.url("acts/shard-0.bin")) == data
    assert fs.ls(s3_server.bucket) == [f"{s3_server.bucket}/acts"]


def test_plain_s3_urls_reach_the_server_through_s3_env(s3_env):
    # what code that only gets an s3:// URL sees: credentials and endpoint from AWS_*
    with fsspec.open(s3_env.url("a/b.txt"), "w") as f:
        f.write("hello")
    with fsspec.open(s3_env.url("a/b.txt")) as f:
        assert f.read() == b"hello"
    assert fsspec.filesystem("s3", **s3_env.storage_options).exists(s3_env.url("a/b.txt"))


def _dvc(root: Path, env: dict, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p.stdout


@pytest.mark.slow
def test_dvc_push_then_pull_from_an_s3_remote(tmp_path, s3_server):
    root = tmp_path / "project"
    root.mkdir()
    (root / "make.py").write_text(MAKE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        # only the remote's own config (endpointurl, --local credentials) reaches the server
        "AWS_CONFIG_FILE": s3_server.no_aws_files,
        "AWS_SHARED_CREDENTIALS_FILE": s3_server.no_aws_files,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    _dvc(root, env, "init", "--no-scm", "-q")
    _dvc(root, env, "stage", "add", "-q", "-n", "make", "-d", "make.py", "-o", "out",
         "python make.py")  # fmt: skip
    _dvc(root, env, "repro", "-q")
    before = {p.relative_to(root): p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()}
    assert len(before) == 4

    remote = s3_server.url("dvcstore")
    _dvc(root, env, "remote", "add", "-d", "storage", remote)
    _dvc(root, env, "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url)
    _dvc(root, env, "remote", "modify", "--local", "storage", "access_key_id", s3_server.key)
    _dvc(root, env, "remote", "modify", "--local", "storage", "secret_access_key", s3_server.secret)  # fmt: skip
    _dvc(root, env, "push")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    pushed = fs.find(remote)
    assert len(pushed) == 5, pushed  # four files + the directory's manifest (.dir)

    # a fresh machine: no cache, no outputs; only dvc.lock and the remote
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "out")
    _dvc(root, env, "pull")
    after = {p.relative_to(root): p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()}
    assert after == before
    assert "up to date" in _dvc(root, env, "status").lower()


def test_activation_store_reads_from_s3_and_names_a_corrupt_shard(s3_server, tmp_path):
    """A store pushed to object storage is read in place: same rows, same SAE training
    input, and a flipped byte there is reported with the shard's s3:// URL."""
    import numpy as np
    import pytest

    from stages.activations import ActivationStore, CorruptStoreError
    from tests.backbone import _cache_script

    local = tmp_path / "store"
    _cache_script.run(local)
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    url = s3_server.url("acts/tiny")
    fs.put(str(local), url, recursive=True)
    a, b = ActivationStore(local), ActivationStore(url, s3_server.storage_options)
    assert b.hooks == a.hooks and b.n_rows == a.n_rows and str(b.path) == url
    for name in [*a.hooks, "token_ids", "doc_ids"]:
        assert np.array_equal(a.read(name), b.read(name)), name
    src = b.source(a.hooks[0], "train")
    assert np.array_equal(src.read(64, 192), a.source(a.hooks[0], "train").read(64, 192))

    shard = f"{url}/{a.hooks[1]}/c/1/0"
    data = bytearray(fs.cat(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(shard, bytes(data))
    fs.invalidate_cache()
    with pytest.raises(CorruptStoreError, match=f"{shard}: stored data fails its CRC32C"):
        ActivationStore(url, s3_server.storage_options).read(a.hooks[1])
    with pytest.raises(FileNotFoundError, match="no activation store here"):
        ActivationStore(s3_server.url("acts/none"), s3_server.storage_options)
