"""python -m hull.shim.proto: regenerate the protobuf modules (scripts/gen-proto.sh)."""

from hull.shim import proto

proto.generate()
print(f"generated protobuf modules in {proto.PROTO_DIR}")
