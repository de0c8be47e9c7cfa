"""Cache keys, codecs and sharding: pure functions, real photo pixels."""

from __future__ import annotations

import pytest
import torch

from anonloader.cache.codecs import get_codec
from anonloader.cache.keys import KEY_SIZE, cache_key, derive_salt, salt_check
from anonloader.cache.precompute import shard_range
from anonloader.errors import CacheCorruptError, ConfigError

FP_A = "a" * 64
FP_B = "b" * 64


def test_key_is_xxh3_128_of_content_fingerprint_and_salt():
    key = cache_key(b"image-bytes", FP_A, derive_salt("secret"))
    assert len(key) == KEY_SIZE
    assert key == cache_key(b"image-bytes", FP_A, derive_salt("secret"))
    assert key != cache_key(b"image-bytes", FP_B, derive_salt("secret"))  # another pipeline
    assert key != cache_key(b"image-bytes", FP_A, derive_salt("other"))  # another secret
    assert key != cache_key(b"image-bytez", FP_A, derive_salt("secret"))  # another image
    assert key != cache_key(b"image-bytes", FP_A)  # no secret
    # length prefixes: moving bytes between parts changes the key
    assert cache_key(b"ab", "c" * 2) != cache_key(b"a", "bc" + "c")


def test_salt_is_derived_never_the_secret():
    secret = b"correct horse battery staple"
    salt = derive_salt(secret)
    assert len(salt) == 32 and secret not in salt
    assert derive_salt(secret.decode()) == salt
    assert derive_salt(None) == b""
    check = salt_check(salt)
    assert check != salt.hex()[:16] and check == salt_check(derive_salt(secret)) and check != salt_check(derive_salt("x"))
    assert salt_check(b"") == "none"


@pytest.mark.parametrize("name", ["png", "webp", "raw"])
def test_lossless_codecs_round_trip_a_photo_exactly(astronaut_image, name):
    image = astronaut_image[:, 100:228, 150:278].contiguous()  # 3,128,128 multiples of 1/255
    codec = get_codec(name)
    decoded = codec.decode(codec.encode(image))
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 128, 128)
    assert torch.equal(decoded.float() / 255, image)


def test_jpeg_is_close_and_quality_is_parsed(astronaut_image):
    image = astronaut_image[:, 100:228, 150:278].contiguous()
    codec = get_codec("jpeg:90")
    assert codec.quality == 90 and not codec.lossless
    decoded = codec.decode(codec.encode(image)).float() / 255
    assert (decoded - image).abs().mean() < 0.02
    assert len(get_codec("jpeg:50").encode(image)) < len(codec.encode(image))


def test_codec_errors():
    with pytest.raises(ConfigError, match="unknown cache codec"):
        get_codec("gif")
    with pytest.raises(ConfigError, match="quality"):
        get_codec("jpeg:0")
    with pytest.raises(CacheCorruptError):
        get_codec("png").decode(b"\x89PNG not really")
    with pytest.raises(CacheCorruptError):
        get_codec("raw").decode(b"\x03\x00\x00\x00" * 3 + b"\x00" * 5)


@pytest.mark.parametrize(("n", "world"), [(0, 1), (10, 1), (10, 3), (7, 4), (3, 8)])
def test_shard_range_is_a_partition(n, world):
    ranges = [shard_range(n, world, rank) for rank in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))
    assert max(len(r) for r in ranges) - min(len(r) for r in ranges) <= 1
    assert ranges == [shard_range(n, world, rank) for rank in range(world)]  # pure


def test_shard_range_rejects_bad_ranks():
    with pytest.raises(ConfigError):
        shard_range(10, 2, 2)
    with pytest.raises(ConfigError):
        shard_range(10, 0, 0)
