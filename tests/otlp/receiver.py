#!/usr/bin/env python3
"""A real OTLP profiles receiver for the tests, built only from PyPI's
opentelemetry-proto (the official generated classes) and grpcio.

It serves opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export
on loopback, decodes every request with the official classes, checks that every
dictionary index resolves and that each table's entry 0 is the zero value, and writes
one JSON line per request to --out:

  {"resources": [{"attributes": {...}, "scope": "...", "profiles": [
      {"sample_type": ["samples", "count"], "period_type": [...], "period": N,
       "samples": [{"frames": ["leaf", ..., "root"], "frame_types": [...],
                    "values": [..], "attributes": {...}}]}]}],
   "mappings": [{"filename": "...", "attributes": {...}}],
   "errors": ["..."], "bytes": N, "metadata": {...}}

"bytes" is the request's uncompressed protobuf size; "gzip_bytes" is its size
gzipped at level 6, the level tonic's gzip uses on the wire (bench/agent_outage.py).

"call" numbers the calls from 1 and "sha256" is a digest of the decoded request
(re-encoded), the same for every attempt at the same request.

Modes: ok (default), reject (--code NAME: every call fails with that status, or only
the first N calls with --refuse-first N, then they succeed; the message carries the
call's number and size, as real servers' messages carry sizes and ids),
stall (--stall SECONDS before answering). --retry-delay SECONDS adds to each
rejection a google.rpc.RetryInfo with that delay (the OTLP way to throttle), in the
grpc-status-details-bin trailer as grpcio-status writes it. "t" is the time of the
call (seconds, monotonic). --partial-reject N answers every accepted
call with partial_success: N profiles rejected, the message carrying the call's
number. --token T requires the header
`authorization: Bearer T` (else UNAUTHENTICATED). --tls-cert/--tls-key serve TLS;
--tls-client-ca CA also requires a client certificate signed by CA (mutual TLS).
Prints "LISTENING <port>" once ready. Stops on SIGTERM.
"""
import argparse
import gzip
import hashlib
import json
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
    profiles_service_pb2_grpc,
)


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, value):
    """One protobuf field: an int as a varint, bytes length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def status_with_retry_info(code, message, delay):
    """An encoded google.rpc.Status whose details hold a RetryInfo of `delay` s
    (google/rpc/status.proto, error_details.proto; protobuf Any and Duration)."""
    secs, nanos = int(delay), int(round((delay - int(delay)) * 1e9))
    duration = field(1, secs) + field(2, nanos)
    retry_info = field(1, duration)
    any_ = field(1, b"type.googleapis.com/google.rpc.RetryInfo") + field(2, retry_info)
    return field(1, code.value[0]) + field(2, message.encode()) + field(3, any_)


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind in ("array_value", "kvlist_value"):
        return str(getattr(v, kind))
    return getattr(v, kind)


def decode(request):
    """The request as plain data: its resources and the dictionary's mappings
    (past the zero entry), plus every index that does not resolve."""
    d = request.dictionary
    errors = []

    def check_zero(name, table, zero):
        if len(table) == 0:
            errors.append(f"{name} is empty (entry 0 must be the zero value)")
        elif table[0] != zero:
            errors.append(f"{name}[0] is not the zero value: {table[0]!r}")

    check_zero("string_table", d.string_table, "")
    from opentelemetry.proto.profiles.v1development import profiles_pb2 as p

    check_zero("mapping_table", d.mapping_table, p.Mapping())
    check_zero("location_table", d.location_table, p.Location())
    check_zero("function_table", d.function_table, p.Function())
    check_zero("stack_table", d.stack_table, p.Stack())
    check_zero("attribute_table", d.attribute_table, p.KeyValueAndUnit())
    if len(d.link_table) > 0:
        check_zero("link_table", d.link_table, p.Link())

    def at(table, name, i):
        if i < 0 or i >= len(table):
            errors.append(f"{name} index {i} out of range ({len(table)})")
            return None
        return table[i]

    def s(i):
        v = at(d.string_table, "string", i)
        return "" if v is None else v

    def attrs(indices):
        out = {}
        for i in indices:
            kv = at(d.attribute_table, "attribute", i)
            if kv is not None:
                out[s(kv.key_strindex)] = any_value(kv.value)
        return out

    mappings = [
        {"filename": s(m.filename_strindex), "attributes": attrs(m.attribute_indices)}
        for m in d.mapping_table[1:]
    ]
    for f in d.function_table:
        s(f.name_strindex), s(f.system_name_strindex), s(f.filename_strindex)

    def frames_of(stack_index):
        stack = at(d.stack_table, "stack", stack_index)
        names, types = [], []
        if stack is None:
            return names, types
        for li in stack.location_indices:
            loc = at(d.location_table, "location", li)
            if loc is None:
                continue
            if loc.mapping_index:
                m = at(d.mapping_table, "mapping", loc.mapping_index)
                # profiles.proto: a location's address "should be within
                # [Mapping.memory_start...Mapping.memory_limit]".
                if m is not None and not m.memory_start <= loc.address < m.memory_limit:
                    errors.append(f"location address {loc.address:#x} outside its mapping "
                                  f"[{m.memory_start:#x}, {m.memory_limit:#x})")
            ftype = attrs(loc.attribute_indices).get("profile.frame.type")
            for line in loc.lines:
                fn = at(d.function_table, "function", line.function_index)
                if fn is not None:
                    names.append(s(fn.name_strindex))
                    types.append(ftype)
        return names, types

    resources = []
    for rp in request.resource_profiles:
        keys = [a.key for a in rp.resource.attributes]
        if len(set(keys)) != len(keys):
            errors.append(f"resource attribute keys repeat: {keys}")
        res = {
            "attributes": {a.key: any_value(a.value) for a in rp.resource.attributes},
            "profiles": [],
        }
        for sp in rp.scope_profiles:
            res["scope"] = sp.scope.name
            for prof in sp.profiles:
                out = {
                    "sample_type": [s(prof.sample_type.type_strindex), s(prof.sample_type.unit_strindex)],
                    "period_type": [s(prof.period_type.type_strindex), s(prof.period_type.unit_strindex)],
                    "period": prof.period,
                    "time_unix_nano": prof.time_unix_nano,
                    "duration_nano": prof.duration_nano,
                    "attributes": attrs(prof.attribute_indices),
                    "samples": [],
                }
                for sample in prof.samples:
                    names, types = frames_of(sample.stack_index)
                    out["samples"].append({
                        "frames": names,
                        "frame_types": types,
                        "values": list(sample.values),
                        "attributes": attrs(sample.attribute_indices),
                    })
                res["profiles"].append(out)
        resources.append(res)
    return resources, mappings, errors


class Servicer(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.lock = threading.Lock()
        self.calls = 0

    def Export(self, request, context):
        with self.lock:
            self.calls += 1
            call = self.calls
        md = {k: v for k, v in context.invocation_metadata()}
        if self.args.token is not None and md.get("authorization") != f"Bearer {self.args.token}":
            self.record(request, md, call, status="UNAUTHENTICATED")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        if self.args.mode == "stall":
            time.sleep(self.args.stall)
        if self.args.mode == "reject" and (self.args.refuse_first == 0 or call <= self.args.refuse_first):
            self.record(request, md, call, status=self.args.code)
            code = getattr(grpc.StatusCode, self.args.code)
            message = f"rejected by test: {self.args.code} (call {call}, {request.ByteSize()} bytes)"
            if self.args.retry_delay is not None:
                details = status_with_retry_info(code, message, self.args.retry_delay)
                context.set_trailing_metadata((("grpc-status-details-bin", details),))
            context.abort(code, message)
        self.record(request, md, call, status="OK")
        resp = profiles_service_pb2.ExportProfilesServiceResponse()
        if self.args.partial_reject:
            resp.partial_success.rejected_profiles = self.args.partial_reject
            resp.partial_success.error_message = (
                f"{self.args.partial_reject} profiles rejected by test (call {call})"
            )
        return resp

    def record(self, request, md, call, status):
        resources, mappings, errors = decode(request)
        encoded = request.SerializeToString(deterministic=True)
        line = json.dumps({
            "status": status,
            "call": call,
            "t": time.monotonic(),
            "sha256": hashlib.sha256(encoded).hexdigest(),
            "bytes": request.ByteSize(),
            "gzip_bytes": len(gzip.compress(encoded, compresslevel=6)),
            "metadata": {k: v for k, v in md.items() if not k.startswith("grpc-")},
            "resources": resources,
            "mappings": mappings,
            "errors": errors,
        })
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["ok", "reject", "stall"], default="ok")
    ap.add_argument("--code", default="UNAVAILABLE")
    ap.add_argument("--refuse-first", type=int, default=0)
    ap.add_argument("--stall", type=float, default=30.0)
    ap.add_argument("--retry-delay", type=float)
    ap.add_argument("--token")
    ap.add_argument("--partial-reject", type=int, default=0)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--tls-client-ca")
    args = ap.parse_args()

    out = open(args.out, "a")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(Servicer(args, out), server)
    addr = f"127.0.0.1:{args.port}"
    if args.tls_cert:
        client_ca = open(args.tls_client_ca, "rb").read() if args.tls_client_ca else None
        creds = grpc.ssl_server_credentials(
            [(open(args.tls_key, "rb").read(), open(args.tls_cert, "rb").read())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    server.start()
    print(f"LISTENING {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=0)


if __name__ == "__main__":
    sys.exit(main())
