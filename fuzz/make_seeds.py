#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/seeds/<target>/.

Run from anywhere: python3 fuzz/make_seeds.py. The seeds are the repository's
fixtures and reference policy, the replies of docs/EXTENSIONS.md and the intake
requests of docs/PIPELINE.md, plus hostile inputs (deep nesting, huge numbers,
invalid UTF-8, oversized collections). `cargo fuzz` grows fuzz/corpus/<target>/ from
them; both directories are kept in the repository (see docs/FUZZING.md).
"""
import json
import os
import pathlib
import shutil

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
SEEDS = FUZZ / "seeds"
SEP = b"\xff"


def deep(n, leaf=1, kind="array"):
    text = json.dumps(leaf)
    for _ in range(n):
        text = f"[{text}]" if kind == "array" else f'{{"k":{text}}}'
    return text.encode()


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes):
        data = json.dumps(data, separators=(",", ":")).encode()
    (d / name).write_bytes(data)


def fixture_parse():
    t = "fixture_parse"
    for f in sorted((ROOT / "fixtures" / "extensions").glob("*.json")):
        write(t, "repo-" + f.name, f.read_bytes())
    policy = (ROOT / "fixtures" / "policies" / "default" / "default.json").read_bytes()
    all_fixtures = [json.loads(f.read_text()) for f in sorted((ROOT / "fixtures" / "extensions").glob("*.json"))]
    write(t, "all-with-default-policy", json.dumps(all_fixtures).encode() + SEP + policy)
    versioned = {
        "id": "normalize_text", "type": "pre", "subject": "beamline.ext.pre.normalize_text.v1",
        "timeout_ms": 100, "retry": 0, "enabled": True, "config": {},
        "metadata": {"description": "Text normalization pre-processor", "version": "v1",
                     "max_payload_size": 1024, "allowed_tenants": ["acme", "fuzz"]},
        "versions": [
            {"version": "v2", "subject": "beamline.ext.pre.normalize_text.v2", "timeout_ms": 150,
             "routing_rules": {"tenant_id": ["premium_tenant"]}},
            {"version": "v10", "routing_rules": {"tenant_id": "fuzz", "region": "eu"},
             "created_at": "2024-01-01T00:00:00Z"},
            {"version": "v3", "routing_rules": {"tenant_id": []}, "enabled": False},
        ],
        "instances": [
            {"instance_id": "a", "weight": 75, "health_status": "healthy"},
            {"instance_id": "b", "subject": "beamline.ext.pre.normalize_text.v1.b", "weight": 25},
            {"instance_id": "c", "weight": 0, "health_status": "unhealthy", "enabled": False},
        ],
    }
    write(t, "versions-instances", versioned)
    write(t, "versions-instances-policy",
          json.dumps([versioned] + all_fixtures[:1]).encode() + SEP + json.dumps({
              "providers": [{"name": "p", "weight": 1}],
              "pre": [{"id": "normalize_text", "when": {"tenant_id": "fuzz"}, "config": {"x": 1}}],
              "validators": [{"id": "missing", "on_fail": "warn"}],
              "post": [{"id": "normalize_text", "mode": "optional"}],
          }).encode())
    bad = dict(all_fixtures[0])
    write(t, "bad-unknown-field", dict(bad, colour="red"))
    write(t, "bad-type", dict(bad, type="preprocessor"))
    write(t, "bad-wildcard-subject", dict(bad, subject="beamline.ext.>"))
    write(t, "bad-duplicate", [bad, bad])
    write(t, "huge-numbers", b'{"id":"x","type":"pre","subject":"a.b","timeout_ms":99999999999999999999999,"retry":-1e400}')
    write(t, "huge-weight", dict(versioned, instances=[{"instance_id": "a", "weight": 9223372036854775807}]))
    write(t, "deep-config", b'{"id":"x","type":"pre","subject":"a.b","config":' + deep(200, kind="object") + b"}")
    write(t, "deep-array", deep(4000))
    write(t, "invalid-utf8", b'{"id":"\xc3\x28","type":"pre","subject":"a.\xff\xfe"}')
    write(t, "bom-and-nul", b'\xef\xbb\xbf{"id":"a\\u0000b","type":"pre","subject":"a.b"}')
    write(t, "empty", b"")
    write(t, "scalar", b"42")


def policy_when():
    t = "policy_when"
    policy = (ROOT / "fixtures" / "policies" / "default" / "default.json").read_bytes()
    write(t, "repo-default-policy", policy)
    reference = {
        "version": "1.0",
        "providers": [{"name": "openai", "weight": 70}, {"name": "anthropic", "weight": 30}],
        "sticky": False,
        "pre": [{"id": "normalize_text", "mode": "required"}],
        "validators": [{"id": "pii_guard", "on_fail": "block"}],
        "post": [{"id": "mask_pii", "mode": "optional"}],
        "fallbacks": [{"when": {"status": ["timeout", "5xx"]}, "retry": 2, "to": "anthropic"}],
        "metadata": {"description": "reference"},
    }
    write(t, "reference-policy", reference)
    write(t, "policy-with-whens", {
        "providers": [{"name": "p", "weight": 1, "extension": "test_provider"}], "sticky": True,
        "pre": [{"id": "a", "when": {"tenant_id": "acme"}},
                {"id": "b", "when": {">": [{"var": "context.priority"}, 3]}}],
        "validators": [{"id": "v", "on_fail": "ignore", "when": {"in": [{"var": "user.tier"}, ["gold"]]}}],
        "post": [{"id": "c", "when": {"!=": [{"var": "missing"}, 1]}}],
        "fallbacks": [{"when": {"status": "unavailable"}, "retry": 0, "to": "p"}],
        "circuit_breaker": {"failure_threshold": 2, "timeout_seconds": 5},
    })
    write(t, "when-equals", {"tenant_id": "acme", "channel": ["web", "app"]})
    write(t, "when-ops", {"==": [{"var": "context.status"}, "timeout"], ">=": [{"var": "priority"}, 5],
                          "<": [{"var": "score"}, 1], "<=": [{"var": "big"}, 1e308]})
    write(t, "when-nested-var", {"in": [{"var": "context.user.geo.country"}, ["DE", "FR"]]})
    write(t, "when-with-context", json.dumps({">": [{"var": "n"}, 1]}).encode() + SEP + b'{"n": 2, "a": {"b": [1]}}')
    write(t, "when-dotted-key", json.dumps({"a.b": "dotted"}).encode() + SEP + b'{"a.b": "dotted", "a": {"b": "x"}}')
    write(t, "when-huge-numbers", b'{">": [{"var": "big"}, 1e400], "neg": -99999999999999999999999}')
    write(t, "when-bad-operator", {"in": [{"var": "x"}, "notalist"]})
    write(t, "when-bad-arity", {">": [{"var": "x"}]})
    write(t, "when-object-value", {"k": {"nested": 1}})
    write(t, "when-deep", b'{"k":' + deep(120) + b"}")
    write(t, "policy-too-many-steps", dict(reference, pre=[{"id": f"p{i}"} for i in range(6)]))
    write(t, "policy-bad-mode", dict(reference, pre=[{"id": "n", "mode": "mandatory"}]))
    write(t, "invalid-utf8", b'{"tenant_id": "\xff\xfe"}')
    write(t, "deep-array", deep(4000))


def extension_reply():
    t = "extension_reply"
    replies = {
        "pre-fields": {"payload": {"payload": "the rewritten text"}, "metadata": {"language": "en"}},
        "pre-text": {"payload": "just text"},
        "pre-empty": {},
        "pre-readdress": {"payload": {"payload": "x", "tenant_id": "evil", "message_id": "m", "trace_id": "t",
                                       "message_type": "chat", "metadata": {"a": 1}}},
        "pre-bad-metadata": {"payload": {"message_type": "x", "metadata": 5}},
        "validator-ok": {"status": "ok"},
        "validator-reject": {"status": "reject", "reason": "pii_detected", "details": {"kinds": ["email"]}},
        "validator-valid-false": {"valid": False, "reason": 7},
        "validator-maybe": {"status": "maybe"},
        "provider": {"provider_id": "test_provider", "output": "...", "usage": {"prompt_tokens": 3, "completion_tokens": 5}, "metadata": {}},
        "provider-error": {"status": "error", "error_code": "rate_limited", "error_message": "slow down"},
        "provider-bad-usage": {"provider_id": "p", "usage": {"prompt_tokens": -1, "completion_tokens": 1e400}},
        "error-object": {"error": {"code": "rate_limited", "message": "..."}},
        "error-string": {"error": "boom"},
        "error-number": {"error": 5},
    }
    for name, r in replies.items():
        write(t, name, r)
    write(t, "huge-usage", b'{"provider_id":"p","usage":{"prompt_tokens":18446744073709551616,"completion_tokens":1}}')
    write(t, "deep", deep(11, kind="object"))
    write(t, "deep-beyond-serde", deep(4000))
    write(t, "wide", json.dumps({f"k{i}": i for i in range(51)}))
    write(t, "array", b"[1,2]")
    write(t, "invalid-utf8", b'{"payload":"\xc3\x28\xff"}')
    write(t, "escaped-surrogate", b'{"payload":"\\ud800"}')


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def s(num, text):
    return field(num, 2, text if isinstance(text, bytes) else text.encode())


def map_entry(num, k, v):
    return field(num, 2, s(1, k) + s(2, v))


def decide_request():
    t = "decide_request"
    write(t, "nats-pipeline-doc", {"version": "1", "request_id": "r-1", "tenant_id": "acme",
                                   "task": {"type": "chat", "payload": "  Hello   world "}})
    write(t, "nats-full", {"version": 1, "request_id": "r-2", "trace_id": "t-2", "tenant_id": "acme",
                           "task": {"type": "chat", "payload": {"structured": [1, 2]}}, "policy_id": "default",
                           "constraints": {"deadline": 1, "dry_run": True}, "metadata": {"channel": "web"}})
    write(t, "nats-bad-version", {"version": "2", "request_id": "r", "tenant_id": "a", "task": {"type": "c", "payload": "x"}})
    write(t, "nats-missing-task", {"request_id": "r", "tenant_id": "a"})
    write(t, "nats-bad-constraints", {"request_id": "r", "tenant_id": "a", "task": {"type": "c", "payload": "x"}, "constraints": [1]})
    write(t, "nats-hostile-ids", {"request_id": "r\r\nX: y", "tenant_id": "a b*>", "task": {"type": "c\u0000", "payload": "x"}})
    write(t, "nats-huge-numbers", b'{"version":1e400,"request_id":"r","tenant_id":"a","task":{"type":"c","payload":123456789012345678901234567890}}')
    write(t, "nats-deep-metadata", b'{"request_id":"r","tenant_id":"a","task":{"type":"c","payload":"x"},"metadata":{"k":' + deep(100) + b"}}")
    write(t, "nats-invalid-utf8", b'{"request_id":"\xff","tenant_id":"a","task":{"type":"c","payload":"\xc3\x28"}}')
    write(t, "nats-deep-array", deep(4000))
    message = (s(1, "m-1") + s(2, "acme") + s(3, "t-1") + s(4, "chat") + s(5, "Hello world")
               + map_entry(6, "channel", "web") + field(7, 0, varint(1700000000000)))
    grpc = field(1, 2, message) + s(2, "default") + map_entry(3, "request_id", "r-1") + map_entry(3, "deadline", "1")
    write(t, "grpc-route-request", grpc)
    write(t, "grpc-no-message", s(2, "default"))
    write(t, "grpc-invalid-utf8-payload", field(1, 2, s(2, "acme") + s(5, b"\xff\xfe")))
    write(t, "grpc-dry-run", field(1, 2, s(2, "acme") + s(5, "hi")) + map_entry(3, "dry_run", "true"))
    write(t, "grpc-truncated", grpc[:-3])


if __name__ == "__main__":
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    fixture_parse()
    policy_when()
    extension_reply()
    decide_request()
    for d in sorted(SEEDS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} seeds")
