"""The profile registry against a real server: versioning by both weights digests,
staleness when a model changes, refusal of bad input, persistence across restarts."""

from __future__ import annotations

import dataclasses

import pytest

from cachesvc_client import (CacheClient, FailedPreconditionError, InvalidArgumentError,
                             NotFoundError)
from conftest import TINY

DOC = {"plans": [{"groups": [[2, 4]], "quality": 0.97}], "layers": 4}


def _pair(client: CacheClient, family=TINY) -> None:
    client.register_model("base", "aaaa0000", family)
    client.register_model("tuned", "bbbb0000", family)


def test_put_get_list_and_versions(client):
    _pair(client)
    assert client.put_profile("base", "tuned", "AAAA0000", "bbbb0000", DOC) == 1
    got = client.get_profile("base", "tuned")
    assert got.document == DOC and got.version == 1 and got.producer_digest == "aaaa0000"
    assert client.put_profile("base", "tuned", "aaaa0000", "bbbb0000", {**DOC, "layers": 4, "v": 2}) == 2
    assert client.get_profile("base", "tuned").document["v"] == 2
    [info] = client.list_profiles(consumer="tuned")
    assert (info.producer, info.version, info.stale) == ("base", 2, False) and info.size_bytes > 0
    assert client.list_profiles(producer="tuned") == []
    with pytest.raises(NotFoundError, match="no profile for producer 'tuned' and consumer 'base'"):
        client.get_profile("tuned", "base")


def test_a_changed_model_makes_its_profiles_stale(client):
    _pair(client)
    client.put_profile("base", "tuned", "aaaa0000", "bbbb0000", DOC)
    client.register_model("tuned", "cccc0000", TINY, replace=True)      # re-trained consumer
    with pytest.raises(FailedPreconditionError, match="stale.*re-profile"):
        client.get_profile("base", "tuned")
    assert [p.stale for p in client.list_profiles()] == [True]
    with pytest.raises(FailedPreconditionError, match="measured on 'tuned' with weights bbbb0000"):
        client.put_profile("base", "tuned", "aaaa0000", "bbbb0000", DOC)
    assert client.put_profile("base", "tuned", "aaaa0000", "cccc0000", DOC) == 2
    assert client.get_profile("base", "tuned").consumer_digest == "cccc0000"


def test_bad_profiles_are_refused_and_nothing_is_stored(client):
    _pair(client)
    client.register_model("other", "dddd0000", dataclasses.replace(TINY, tokenizer_fingerprint="other"))
    cases = [
        # a model's own pair (its cross-context profile) is checked against its weights too
        (("base", "base", "aaaa0000", "ffff0000", DOC), FailedPreconditionError, "profile the registered model"),
        (("base", "ghost", "aaaa0000", "bbbb0000", DOC), NotFoundError, "model 'ghost' is not registered"),
        (("base", "other", "aaaa0000", "dddd0000", DOC), FailedPreconditionError, "cannot share a cache"),
        (("base", "tuned", "aaaa0000", "bbbb0000", {"x": "y" * (5 << 20)}), InvalidArgumentError,
         "more than the 4194304 allowed"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            client.put_profile(*args)
    assert client.list_profiles() == []
    # Not JSON, or JSON but not an object: only reachable below the SDK.
    from cachesvc.v1 import cachesvc_pb2 as pb
    for document, message in ((b"\xff\xfe", "not UTF-8 JSON"), (b"[1, 2]", "must be a JSON object")):
        spec = pb.ProfileSpec(producer="base", consumer="tuned", producer_digest="aaaa0000",
                              consumer_digest="bbbb0000", document=document)
        with pytest.raises(InvalidArgumentError, match=message):
            client._call(client._stub.PutProfile, pb.PutProfileRequest(profile=spec))
    assert client.list_profiles() == [] and client.stats()["entries"] == 0   # the server still serves


def test_flags_stick_to_their_version_until_re_profiling(client):
    _pair(client)
    client.put_profile("base", "tuned", "aaaa0000", "bbbb0000", DOC)
    assert client.flag_profile("base", "tuned", "plan [2,4) gave 0.40, promised 0.97", version=1)
    assert client.flag_profile("base", "tuned", "again")                       # any version
    [info] = client.list_profiles()
    assert (info.flagged, info.flags) == ("again", 2)
    assert client.get_profile("base", "tuned").flagged == "again"                # still served
    assert client.put_profile("base", "tuned", "aaaa0000", "bbbb0000", DOC) == 2   # re-profiled
    assert client.get_profile("base", "tuned").flagged == ""
    # A guard that judged version 1 does not flag version 2.
    assert not client.flag_profile("base", "tuned", "late report on the old profile", version=1)
    assert client.list_profiles()[0].flags == 0
    for args, error, message in ((("base", "tuned", ""), InvalidArgumentError, "needs a reason"),
                                 (("base", "tuned", "x" * 2000), InvalidArgumentError, "more than the 1024"),
                                 (("tuned", "base", "why"), NotFoundError, "no profile for producer 'tuned'")):
        with pytest.raises(error, match=message):
            client.flag_profile(*args)
    assert client.list_profiles()[0].flags == 0


def test_profiles_survive_a_restart(server_factory):
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        _pair(client)
        client.put_profile("base", "tuned", "aaaa0000", "bbbb0000", DOC)
        client.flag_profile("base", "tuned", "drifted")
    srv.stop()
    again = server_factory("--memory-bytes", "64MiB", workdir=srv.workdir)
    with CacheClient(again.address) as client:
        got = client.get_profile("base", "tuned")
        assert got.document == DOC and got.version == 1 and got.flagged == "drifted"
