import pytest

from cachesvc.node.config import load_config, parse_size


def test_sizes():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_precedence_defaults_file_env_flags(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('port = 9001\nchunk_size = 128\nmemory_bytes = "64MiB"\ndisk_mode = "spill"\n')
    env = {"CACHESVC_PORT": "9002", "CACHESVC_CHUNK_SIZE": "64"}
    cfg = load_config({"port": "9003"}, env=env, config_file=str(cfg_file))
    assert cfg.port == 9003                 # flag beats env and file
    assert cfg.chunk_size == 64             # env beats file
    assert cfg.memory_bytes == 64 << 20     # file beats default
    assert cfg.disk_mode == "spill"
    assert cfg.host == "127.0.0.1"          # default
    assert load_config({}, env={}).memory_bytes >= 64 << 20   # sized from RAM


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="memory_bytes"):
        load_config({"memory_bytes": "huge"}, env={})
    with pytest.raises(ValueError, match="disk_mode"):
        load_config({}, env={"CACHESVC_DISK_MODE": "sometimes"})
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown keys.*prot"):
        load_config({}, env={}, config_file=str(bad))
