"""Cache keys, codecs and sharding: pure functions, real photo pixels."""

from __future__ import annotations

import pytest
import torch

from anonloader.cache.codecs import DEFAULT_CODEC, get_codec
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


@pytest.mark.parametrize("name", ["lz4", "zstd", "raw", "qoi", "png", "webp"])
def test_lossless_codecs_round_trip_real_photos_exactly(astronaut_image, t1_image, name):
    gray = t1_image[:, 300:397, 500:631].mul(255).round()
    gray = (0.299 * gray[0] + 0.587 * gray[1] + 0.114 * gray[2]).round().div(255).expand(3, -1, -1)
    images = [
        astronaut_image[:, 100:228, 150:278].contiguous(),  # 3,128,128 multiples of 1/255
        t1_image[:, 211:308, 333:464].contiguous(),  # odd size 3,97,131
        gray.contiguous(),  # grayscale origin: three equal channels
        (t1_image[:, :65, :33] * 255).round().to(torch.uint8),  # uint8 input
    ]
    codec = get_codec(name)
    for image in images:
        encoded = codec.encode(image)
        decoded = codec.decode(memoryview(encoded))  # decodes from a buffer, as from LMDB
        expected = image if image.dtype == torch.uint8 else (image * 255).round().to(torch.uint8)
        assert decoded.dtype == torch.uint8 and decoded.shape == image.shape
        assert torch.equal(decoded, expected)
        decoded.add_(1)  # the caller owns the pixels: writable, no view of the stored bytes
        assert torch.equal(codec.decode(encoded), expected)


def test_jpeg_is_close_and_quality_is_parsed(astronaut_image):
    image = astronaut_image[:, 100:228, 150:278].contiguous()
    codec = get_codec("jpeg:90")
    assert codec.quality == 90 and not codec.lossless
    decoded = codec.decode(codec.encode(image)).float() / 255
    assert (decoded - image).abs().mean() < 0.02
    assert len(get_codec("jpeg:50").encode(image)) < len(codec.encode(image))
    assert get_codec("zstd:3").level == 3 and get_codec(None).name == DEFAULT_CODEC == "raw"


def test_codec_errors():
    with pytest.raises(ConfigError, match="unknown cache codec"):
        get_codec("gif")
    with pytest.raises(ConfigError, match="quality"):
        get_codec("jpeg:0")
    with pytest.raises(ConfigError, match="take a number"):
        get_codec("raw:3")
    with pytest.raises(CacheCorruptError):
        get_codec("png").decode(b"\x89PNG not really")
    with pytest.raises(CacheCorruptError):
        get_codec("raw").decode(b"\x03\x00\x00\x00" * 3 + b"\x00" * 5)
    for name in ("lz4", "zstd"):
        good = get_codec(name).encode(torch.zeros(3, 16, 16, dtype=torch.uint8))
        with pytest.raises(CacheCorruptError):
            get_codec(name).decode(good[:12] + b"\xff" * (len(good) - 12))


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
