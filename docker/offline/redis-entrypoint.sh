#!/bin/sh
# Like the official image: without a config file, listen on the container network too
# (protected mode would refuse every client but loopback).
set -e
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec redis-server --bind "0.0.0.0" --protected-mode no "$@"
fi
exec "$@"
