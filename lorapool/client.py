"""`lorapool generate`: stream one generation through a gateway to stdout."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message (sent as chat unless --raw)")
    p.add_argument("--target", default=os.environ.get("LORAPOOL_TARGET", "127.0.0.1:50051"))
    p.add_argument("--adapter", default="", help="`name` or `name:version`; empty: the base model")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, not chat")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    p.add_argument("--tls-cert", help="client certificate, for a gateway that requires mTLS")
    p.add_argument("--tls-key", help="the client certificate's private key")
    p.add_argument(
        "--token", default=os.environ.get("LORAPOOL_API_TOKEN"), help="LORAPOOL_API_TOKEN"
    )


def request_of(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature
    )
    if args.seed is not None:
        sampling.seed = args.seed
    request = generation_pb2.GenerateRequest(adapter=args.adapter, sampling=sampling)
    if args.raw:
        request.text = args.prompt
    else:
        request.chat.messages.add(role="user", content=args.prompt)
    return request


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("lorapool: --tls-cert and --tls-key go together")

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        read(args.tls_ca), private_key=read(args.tls_key), certificate_chain=read(args.tls_cert)
    )
    return grpc.secure_channel(args.target, credentials)


def run(args: argparse.Namespace) -> int:
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    stub = generation_pb2_grpc.GenerationStub(channel(args))
    try:
        for response in stub.Generate(request_of(args), metadata=metadata, timeout=args.timeout):
            if response.HasField("delta"):
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        sys.stderr.write(f"\nlorapool: {code.name}: {exc.details()}\n")  # type: ignore[attr-defined]
        return 1 + int(code.value[0])
    return 0
