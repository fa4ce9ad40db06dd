import io
import json
import tarfile

from shards.verify import main, verify
from shards.write import sha256_file


def test_verify_passes_on_fresh_shards(celeba_shards, capsys):
    assert main([str(celeba_shards), "--workers", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {celeba_shards}: train=47, valid=6, test=6")


def test_one_flipped_byte_fails_with_the_shard_named(shards_copy, capsys):
    shard = shards_copy / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main([str(shards_copy), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL train-000003.tar: sha256" in out and "manifest" in out
    assert "train-000000.tar" not in out


def test_missing_truncated_and_undecodable_shards(shards_copy):
    (shards_copy / "valid-000000.tar").unlink()
    shard = shards_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # a shard whose bytes match the manifest but hold an image that does not decode
    bad = shards_copy / "test-000000.tar"
    with tarfile.open(bad) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(bad, "w") as tf:
        for m, data in members:
            if m.name.endswith(".jpg") and m.name.startswith(members[0][0].name.split(".")[0]):
                data = b"\xff\xd8\xff" + b"\x00" * 40
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    manifest_path = shards_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["test"]["shards"][0]["sha256"] = sha256_file(bad)
    manifest_path.write_text(json.dumps(manifest))
    problems = verify(shards_copy)
    joined = "\n".join(problems)
    assert "valid-000000.tar: missing" in joined
    assert "train-000001.tar: sha256" in joined and "train-000001.tar: unreadable tar after" in joined
    assert "train-000001.tar: 5 samples, manifest says 7" in joined
    assert f"test-000000.tar: {members[0][0].name} does not decode" in joined
    assert not any(p.startswith("test-000000.tar: sha256") for p in problems)


def test_unreadable_manifest_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
