"""Names, versions and digests are full matches: no control character ever passes."""

from __future__ import annotations

import pytest

from adapter_store import repository
from adapter_store.blobkeys import is_digest
from adapter_store.blobs import LocalBlobStore, blob_key, check_digest
from adapter_store.errors import InvalidAdapterRef, InvalidDigest

# Appended, prepended and embedded: newline, carriage return, tab, NUL, DEL, and non-ASCII
# (a letter, a digit and a line separator that regexes may treat as word/digit/space).
CONTROL = ["\n", "\r", "\t", "\x00", "\x7f", "é", "٣", "\u2028", "\r\n", " "]


def variants(good: str) -> list[str]:
    mid = len(good) // 2
    return [v for c in CONTROL for v in (good + c, c + good, good[:mid] + c + good[mid:])]


@pytest.mark.parametrize("name", variants("evil"))
def test_names_with_control_characters_are_refused(name: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        repository.validate_name(name)
    with pytest.raises(InvalidAdapterRef):
        repository.parse_ref(name)
    with pytest.raises(InvalidAdapterRef):
        repository.parse_ref(f"{name}:1")


@pytest.mark.parametrize("version", variants("12"))
def test_versions_with_control_characters_are_refused(version: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        repository.parse_ref(f"good:{version}")


def test_good_names_and_versions_still_pass() -> None:
    assert repository.validate_name("a.b_c-1") == "a.b_c-1"
    assert repository.parse_ref("chat:12") == ("chat", 12)
    assert repository.parse_ref("chat") == ("chat", None)


DIGEST = "ab" * 32


@pytest.mark.parametrize("digest", variants(DIGEST))
def test_digests_with_control_characters_are_refused(digest: str, tmp_path: object) -> None:
    assert not is_digest(digest)
    with pytest.raises(InvalidDigest):
        check_digest(digest)
    with pytest.raises(InvalidDigest):
        blob_key(digest)
    with pytest.raises(InvalidDigest):
        LocalBlobStore(tmp_path).exists(digest)  # type: ignore[arg-type]


def test_good_digest_passes() -> None:
    assert check_digest(DIGEST) == DIGEST and blob_key(DIGEST).endswith(DIGEST[2:])
