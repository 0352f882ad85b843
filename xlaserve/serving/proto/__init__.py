"""Generated gRPC/protobuf modules (checked in: users need no codegen step).

Regenerate after editing a .proto, from the repository root:

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \\
        xlaserve/serving/proto/xlaserve.proto xlaserve/serving/proto/jetstream.proto

The generated code checks the protobuf and grpcio runtimes it needs (see pyproject.toml).
`jetstream_pb2` registers JetStream's `jetstream_proto.*` names: do not import it in a process
that also imports JetStream's own generated modules.
"""
