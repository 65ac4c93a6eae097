"""The committed stubs are what protos/ generates (run `make proto` after editing it)."""

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current(tmp_path):
    rc = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                      f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(ROOT / "protos/cachesvc/v1/cachesvc.proto")])
    assert rc == 0
    for name in ("cachesvc_pb2.py", "cachesvc_pb2.pyi", "cachesvc_pb2_grpc.py"):
        fresh = (tmp_path / "cachesvc" / "v1" / name).read_text()
        assert fresh == (ROOT / "cachesvc" / "v1" / name).read_text(), f"{name} is stale: run make proto"
