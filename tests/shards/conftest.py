"""Shared, session-scoped fixtures: a CelebA-layout source (60 images, one corrupt) and its shards."""

import shutil
import tarfile
from pathlib import Path

import pytest

from shards.synthetic import make_celeba_layout
from shards.write import write_celeba

N_IMAGES, CORRUPT = 60, 7  # 000007.jpg is truncated to 20 bytes
SIZE, SHARD_SAMPLES = 32, 7  # small images; 7 per shard makes the last train shard short


@pytest.fixture(scope="session")
def celeba_src(tmp_path_factory):
    return make_celeba_layout(tmp_path_factory.mktemp("celeba_src"), N_IMAGES, corrupt=(CORRUPT,))


@pytest.fixture(scope="session")
def celeba_shards(celeba_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("celeba_shards") / "celeba32"
    write_celeba(str(out), str(celeba_src["images"]), size=SIZE, shard_samples=SHARD_SAMPLES, workers=1,
                 progress=False)
    return out


@pytest.fixture
def shards_copy(celeba_shards, tmp_path):
    """A private copy of the shards that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(celeba_shards, dst)
    return dst


def _shard_keys(root, names) -> list[str]:
    keys = []
    for name in names:
        with tarfile.open(Path(root) / name) as tf:
            keys += [m.name.split(".")[0] for m in tf if m.name.endswith(".json")]
    return keys


@pytest.fixture(scope="session")
def shard_keys():
    """shard_keys(root, names) -> the sample keys of those shards, in file order."""
    return _shard_keys
