"""Generates the gRPC Python code from proto/ at build and install time.

The generated *_pb2*.py files are build outputs (git-ignored), never edited by hand.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "proto"


def generate_grpc_code() -> None:
    """Run protoc (from grpcio-tools) over every .proto under proto/."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        rel = proto.relative_to(PROTO_ROOT)
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={PROTO_ROOT}",
                f"--pyi_out={PROTO_ROOT}", f"--grpc_python_out={PROTO_ROOT}", str(rel)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_grpc_code()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
