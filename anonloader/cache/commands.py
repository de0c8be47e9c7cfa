"""``anonloader precompute`` and ``anonloader cache stats | verify | merge``.

    anonloader precompute ./images ./faces.lmdb --method blur --workers 2
    anonloader precompute mypkg.data:make_dataset ./faces.lmdb --engine ray --workers 4
    torchrun --nproc_per_node 8 -m anonloader.cache.commands precompute hf-user/faces ./out \\
        --split train --engine torchrun
    anonloader cache stats ./faces.lmdb
    anonloader cache verify ./out            # every tag of every shard; never runs stored code
    anonloader cache merge ./out ./merged.lmdb
    anonloader precompute ./images ./dp.lmdb --method diffprivacy --key-password-file ./pw \\
        --method-options '{"weights": "./dp-msi", "base_model": "./sd15", "recognizer": {"kind": "iresnet", "weights": "./r50.pth"}}' \\
        --method-option num_inference_steps=50        # recovery keys; options go to DiffPrivacy(...)
    anonloader cache recover ./dp.lmdb 17 ./face17.png --method-dir ./dp-msi --base-model ./sd15 --key-password-file ./pw
    anonloader cache strip-keys ./dp.lmdb ./dp-nokeys.lmdb   # a copy without recovery.lmdb

The secret is read from an environment variable (``--secret-env``, default
``ANONLOADER_SECRET``) or a file (``--secret-file``), never from the command line (where any
user could read it in the process list). So is the password of Diff-Privacy's recovery keys
(``--key-password-file``, or ``$ANONLOADER_KEY_PASSWORD``). A cache precomputed with a secret is authenticated
with it: ``cache stats | verify | merge`` need the same secret to read it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anonloader.errors import CacheCorruptError, CacheError, CacheFingerprintError, ConfigError

__all__ = ["main", "merge_caches", "method_options", "recover_sample", "register", "strip_keys"]

logger = logging.getLogger(__name__)


def _secret(args: argparse.Namespace) -> str | bytes | None:
    if args.secret_file is not None:
        try:
            return Path(args.secret_file).read_bytes().strip()
        except OSError as error:
            raise ConfigError(f"cannot read the secret file {args.secret_file} ({error.strerror})") from error
    return os.environ.get(args.secret_env) or None


def _import(spec: str | None) -> Any:
    if spec is None:
        return None
    from anonloader.cache.precompute import _import_object

    return _import_object(spec)


def method_options(method: str, text: str | None = None, pairs: Sequence[str] = ()) -> dict[str, Any]:
    """The constructor options of registry method ``method`` from the command line.

    Args:
        text: ``--method-options``: a JSON object (``'{"weights": "./dp", "tiny": false}'``), or
            ``@path`` of a file holding one.
        pairs: ``--method-option key=value`` items (later ones win over ``text``); each value is
            read as JSON when it parses (``50``, ``true``, ``{"kind": "iresnet"}``), else kept as
            the string (``weights=./dp``).

    Raises:
        ConfigError: the JSON is malformed or not an object, a pair has no ``=``, or a key is
            not a parameter of the method's constructor (the message lists the ones it takes).
    """
    import inspect

    from anonloader.methods import METHODS

    options: dict[str, Any] = {}
    if text is not None:
        source = "--method-options"
        if text.startswith("@"):
            source = text[1:]
            try:
                text = Path(source).expanduser().read_text()
            except OSError as error:
                raise ConfigError(f"cannot read the method options file {source} ({error.strerror}); check the path after '@'") from None
        try:
            loaded = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"{source} is not valid JSON ({error}); give an object such as '{{\"num_inference_steps\": 50}}'") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source} must be a JSON object of option names to values, got {type(loaded).__name__}")
        options.update(loaded)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--method-option {pair!r} is not key=value; write e.g. --method-option inversion_iters=5")
        try:
            options[name.strip()] = json.loads(value)
        except ValueError:
            options[name.strip()] = value
    if not options:
        return options
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    module_name, attribute = METHODS[method].split(":")
    import importlib

    factory = getattr(importlib.import_module(module_name), attribute)
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = sorted(n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self")
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"method {method!r} has no option(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}")
    return options


def _identity(args: argparse.Namespace, secret: Any) -> Any:
    """The keyed assigner of ``--identity``; ``cluster`` is fitted on the ``--embeddings`` store
    (every process fits the same clusters: the result depends only on the store)."""
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.identity.bank import IdentityBank

    bank = None if args.bank is None else IdentityBank.load(args.bank)
    if args.identity != "cluster":
        return KeyedIdentityAssigner(args.identity, secret=secret, bank=bank)
    if args.embeddings is None:
        raise ConfigError(
            "--identity cluster groups every face of the dataset before any is anonymized: embed them first with "
            "`anonloader identity embed SRC STORE` and pass --embeddings STORE"
        )
    from anonloader.identity.store import EmbeddingStore

    store = EmbeddingStore(args.embeddings)
    if store.meta.get("detector") not in (None, args.detector):
        logger.warning(
            "the embeddings in %s were computed with the %r detector, this precompute detects with %r: faces are then "
            "matched to clusters by nearness alone; embed with --detector %s for exact matches",
            args.embeddings, store.meta["detector"], args.detector, args.detector,
        )
    recognizer = (store.meta.get("recognizer") or {}).get("name", "dlib")
    assigner = KeyedIdentityAssigner("cluster", secret=secret, bank=bank, embedder=recognizer)
    store.fit(assigner, shards=args.cluster_shards)
    return assigner


def _run_precompute(args: argparse.Namespace) -> int:
    from anonloader.cache.precompute import precompute

    extra = method_options(args.method, args.method_options, args.method_option)
    method: Any = args.method
    if extra:
        from anonloader.methods import get_method

        method = get_method(args.method, **extra)
    options: dict[str, Any] = {"method": method, "on_error": args.on_error, "on_no_face": args.on_no_face, "device": args.device}
    annotations = _import(args.annotations)
    if args.detector != "none":
        options["detector"] = args.detector
    elif annotations is None:
        raise ConfigError("--detector none needs --annotations pkg.module:function giving each sample's faces")
    secret = _secret(args)
    if args.embeddings is not None and args.identity != "cluster":
        raise ConfigError("--embeddings is for --identity cluster")
    if args.identity is not None:
        options["identity"] = _identity(args, secret)
    image_key: Any = args.image_key
    if image_key is not None and image_key.isdigit():
        image_key = int(image_key)
    report = precompute(
        args.source,
        args.cache,
        split=args.split,
        image_key=image_key,
        annotations=annotations,
        identity_label=_import(args.identity_label),
        secret=secret,
        codec=args.codec,
        workers=args.workers,
        engine=args.engine,
        batch_size=args.batch_size,
        limit=args.limit,
        progress=not args.quiet,
        key_password_file=args.key_password_file,
        **options,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{report.cache_path}: {report.computed} computed, {report.skipped} already cached, "
            f"{report.dropped} dropped, {report.failed} failed, of {report.total} samples in {report.seconds:.1f}s "
            f"({report.images_per_second:.2f} samples/s, engine {report.engine})"
        )
        for failure in report.failures[:20]:
            print(f"FAILED sample {failure.index} ({failure.path or 'no path'}): {failure.reason}")
        if report.failed:
            print("run the same command again to retry the failed samples")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    from anonloader.cache.store import AnonCache

    with AnonCache(args.cache, secret=_secret(args)) as cache:
        stats = cache.stats()
    if args.json:
        print(json.dumps(stats, indent=1, sort_keys=True))
    else:
        for name in sorted(stats):
            print(f"{name:20s} {stats[name]}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from anonloader.cache.store import AnonCache

    with AnonCache(args.cache, secret=_secret(args)) as cache:
        report = cache.verify(decode=args.decode)
    for problem in report.corrupt:
        print(f"CORRUPT {problem}")
    print(
        f"{args.cache}: checked {report.entries} entries, {report.samples} samples and {report.failures} failure "
        f"records, {len(report.corrupt)} corrupt"
    )
    return 0 if report.ok else 1


def merge_caches(
    sources: Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    *,
    secret: Any = None,
    batch: int = 256,
    keys: bool = True,
) -> dict[str, int]:
    """Copies every entry, sample and failure record of ``sources`` (caches, shard folders or
    manifests) into one LMDB at ``destination``, checking each value's tag and structure on
    the way (nothing stored is ever executed), and (``keys``) their Diff-Privacy recovery keys
    into ``destination/recovery.lmdb``: the encrypted blobs as they are, so no password is
    needed (each stays bound to its fingerprint, entry and face; a torchrun run's shards share
    one key derivation, so the merged store opens with the run's password).

    Args:
        secret: the secret the sources were written with (keyed caches), or ``None``.
        keys: copy the recovery keys (``False``: :func:`strip_keys`).

    Returns:
        Counts of copied ``entries``, ``samples``, ``failures``, and ``recovery_keys`` when the
        sources have a key store.

    Raises:
        CacheFingerprintError: the sources were written by different pipelines or secrets.
        ConfigError: their recovery keys were made with different passwords or salts.
        CacheCorruptError: a source value is corrupt or not authentic (nothing is copied from
            a batch holding one; the destination keeps what earlier batches committed).
    """
    from anonloader.cache.format import EntryRecord, FailureRecord, SampleView
    from anonloader.cache.store import AnonCache

    readers = [AnonCache(path, secret=secret) for path in sources]
    try:
        metas = [reader.meta for reader in readers]
        if len({(m["fingerprint"], m["salt_check"]) for m in metas}) > 1:
            raise CacheFingerprintError(
                "the caches to merge were written by different pipelines or secrets: "
                + ", ".join(f"{path} ({m['fingerprint'][:12]}…)" for path, m in zip(sources, metas, strict=True))
            )
        first = metas[0]
        target = AnonCache(
            destination,
            writable=True,
            fingerprint=first["fingerprint"],
            secret=secret,
            codec=first.get("codec", {}).get("name"),
            method=first.get("method"),
        )
        counts = {"entries": 0, "samples": 0, "failures": 0}
        try:
            sizes = [m.get("source_size") for m in metas if m.get("source_size") is not None]
            if sizes:
                target.set_source_size(max(sizes))
            for reader in readers:
                pending: list[tuple[bytes, bytes]] = []
                for path, key, value in reader.iter_entries():
                    EntryRecord.unpack(reader.sealer, key, value, f"entry {key.hex()} in {path}").face_records()
                    pending.append((key, value))
                    if len(pending) >= batch:
                        target.write_encoded(pending)
                        counts["entries"] += len(pending)
                        pending = []
                target.write_encoded(pending)
                counts["entries"] += len(pending)
                samples: list[tuple[int, bytes]] = []
                for path, index, value in reader.iter_samples():
                    view = SampleView.open(reader.sealer, index, value, f"sample {index} in {path}")
                    view.skeleton()
                    view.alphas()
                    samples.append((index, value))
                    if len(samples) >= batch:
                        target.write_encoded([], samples)
                        counts["samples"] += len(samples)
                        samples = []
                target.write_encoded([], samples)
                counts["samples"] += len(samples)
                failures = []
                for path, index, value in reader.iter_failures():
                    FailureRecord.unpack(reader.sealer, index, value, f"failure record {index} in {path}")
                    failures.append((index, value))
                target.write_encoded([], [], failures)
                counts["failures"] += len(failures)
        finally:
            target.close()
        if keys:
            from anonloader.cache.manifest import resolve_cache_path

            shards = [shard for path in sources for shard in resolve_cache_path(path)[1]]
            if any((shard / "recovery.lmdb").is_dir() for shard in shards):
                from anonloader.methods.diffprivacy.store import RecoveryKeyStore

                counts["recovery_keys"] = RecoveryKeyStore.copy_sealed(shards, destination)
        return counts
    finally:
        for reader in readers:
            reader.close()


def recover_sample(
    cache_path: str | os.PathLike[str],
    index: int,
    password: Any = None,
    method: Any = None,
    *,
    slot: int = 0,
    key_password_file: str | os.PathLike[str] | None = None,
    secret: Any = None,
) -> Any:
    """:meth:`AnonCache.recover <anonloader.cache.store.AnonCache.recover>` for one cache or a
    sharded one (``engine="torchrun"``: the sample's shard holds its recovery keys in
    ``<shard>/recovery.lmdb``; the shard is found through the manifest).

    Returns:
        ``3,H,W float32 in [0,1]``: image ``slot`` of sample ``index`` with its faces recovered.
    """
    from anonloader.cache.manifest import resolve_cache_path
    from anonloader.cache.store import AnonCache
    from anonloader.errors import CacheMissError

    _, shards, manifest = resolve_cache_path(cache_path)
    target = Path(cache_path)
    if manifest is not None:
        with AnonCache(cache_path, secret=secret) as sharded:
            found = dict(sharded.sample_shards())
        if index not in found:
            raise CacheMissError(f"sample {index} is not in the sharded cache {cache_path}")
        target = shards[found[index]]
    with AnonCache(target, secret=secret) as cache:
        return cache.recover(index, password, method, slot=slot, key_password_file=key_password_file)


def _run_recover(args: argparse.Namespace) -> int:
    from PIL import Image

    from anonloader.methods.diffprivacy import DiffPrivacy

    extra = method_options("diffprivacy", args.method_options, args.method_option)
    for name in ("weights", "guidance_scale", "select"):
        if name in extra:
            raise ConfigError(f"cache recover sets {name} itself (--method-dir; no guidance at recovery); drop it from the method options")
    options: dict[str, Any] = {"base_model": args.base_model or args.method_dir, "guidance_scale": 0.0, "select": "first"}
    if args.clip_model:
        options["clip_model"] = args.clip_model
    method = DiffPrivacy(args.method_dir, **{**options, **extra})
    image = recover_sample(args.cache, args.index, None, method, slot=args.slot, key_password_file=args.key_password_file, secret=_secret(args))
    array = image.clamp(0, 1).mul(255).round().to("cpu").byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).save(args.out)
    print(f"{args.out}: sample {args.index} image {args.slot} with its faces recovered")
    return 0


def strip_keys(source: str | os.PathLike[str], destination: str | os.PathLike[str], *, secret: Any = None) -> dict[str, int]:
    """A copy of the cache at ``source`` without its recovery keys (``recovery.lmdb``): every
    entry, sample and failure record is copied and checked (:func:`merge_caches`), the key
    store is not."""
    return merge_caches([source], destination, secret=secret, keys=False)


def _run_strip_keys(args: argparse.Namespace) -> int:
    counts = strip_keys(args.source, args.destination, secret=_secret(args))
    print(f"{args.destination}: {counts['entries']} entries and {counts['samples']} samples copied without recovery keys")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    counts = merge_caches(args.sources, args.destination, secret=_secret(args))
    print(
        f"{args.destination}: merged {counts['entries']} entries, {counts['samples']} samples and "
        f"{counts['failures']} failure records from {len(args.sources)} source(s)"
        + (f", {counts['recovery_keys']} encrypted recovery keys" if "recovery_keys" in counts else "")
    )
    return 0


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method-options",
        default=None,
        metavar="JSON",
        help="the method's constructor options as a JSON object, or @file.json (e.g. diffprivacy: weights, base_model, recognizer, inversion_iters)",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one constructor option (repeatable; VALUE read as JSON when it parses, else a string); wins over --method-options",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``precompute`` and ``cache`` to the ``anonloader`` command."""
    pre = subparsers.add_parser(
        "precompute",
        help="anonymize a dataset once into an LMDB cache",
        description="Anonymizes every sample of SOURCE into the cache at CACHE (resumable: samples "
        "already in the cache are skipped). Training then reads AnonCache(CACHE).as_dataset().",
    )
    pre.add_argument("source", help="a folder of images, pkg.module:factory, a saved HF dataset folder, or an HF dataset name")
    pre.add_argument("cache", type=Path, help="cache path (a folder; torchrun writes shards and manifest.json in it)")
    pre.add_argument("--split", default=None, help="split of a Hugging Face dataset (default train)")
    pre.add_argument("--method", default="blur", help="blur | pixelate | mask | fams | iddiffuse | diffdeid | diffprivacy")
    pre.add_argument("--detector", default="default", help="default (CenterFace stage) | fast | strong | mtcnn | scrfd | none (with --annotations)")
    pre.add_argument("--annotations", default=None, help="pkg.module:function(sample) -> the sample's face boxes")
    pre.add_argument("--identity-label", default=None, help="pkg.module:function(sample) -> identity label")
    pre.add_argument(
        "--identity",
        choices=("label", "cluster", "online"),
        default=None,
        help="keyed real-to-synthetic identity mapping (with --bank; 'label' needs --identity-label)",
    )
    pre.add_argument("--bank", default=None, help="synthetic identity bank folder (IdentityBank.save)")
    pre.add_argument(
        "--embeddings",
        type=Path,
        default=None,
        help="--identity cluster: the embeddings store of `anonloader identity embed` (sensitive) to fit the clusters on",
    )
    pre.add_argument("--cluster-shards", type=int, default=1, help="--identity cluster: Ray Data blocks for the k-NN search (1: none)")
    pre.add_argument("--image-key", default=None, help="dict key or tuple position of the image")
    pre.add_argument("--codec", default=None, help="raw (default, lossless, fastest reads) | lz4 | zstd | qoi | png | webp | jpeg[:quality]")
    pre.add_argument("--workers", type=int, default=1, help="processes (local, torchrun per rank) or actors (ray)")
    pre.add_argument("--engine", choices=("local", "ray", "torchrun"), default="local")
    pre.add_argument("--batch-size", type=int, default=8, help="samples per commit / per Ray batch")
    pre.add_argument("--limit", type=int, default=None, help="only the first N samples")
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--on-error", choices=("obscure", "drop", "raise"), default="obscure")
    pre.add_argument("--on-no-face", choices=("keep", "drop", "obscure"), default="keep")
    pre.add_argument("--secret-env", default="ANONLOADER_SECRET", help="environment variable holding the secret")
    pre.add_argument("--secret-file", default=None, help="file holding the secret")
    pre.add_argument(
        "--key-password-file",
        default=None,
        help="file holding the recovery-key password (diffprivacy; or $ANONLOADER_KEY_PASSWORD)",
    )
    _add_method_options(pre)
    pre.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(run=_run_precompute)

    cache = subparsers.add_parser("cache", help="inspect, verify and merge anonymized caches")
    actions = cache.add_subparsers(dest="action", required=True)
    stats = actions.add_parser("stats", help="counts, size, fingerprint, method, codec")
    stats.add_argument("cache", type=Path)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_run_stats)
    verify = actions.add_parser("verify", help="check every value's tag (exit 1 when any is corrupt or not authentic)")
    verify.add_argument("cache", type=Path)
    verify.add_argument("--decode", action="store_true", help="also decode every image")
    verify.set_defaults(run=_run_verify)
    merge = actions.add_parser("merge", help="merge caches or shards into one LMDB")
    merge.add_argument("sources", type=Path, nargs="+")
    merge.add_argument("destination", type=Path)
    merge.set_defaults(run=_run_merge)
    recover = actions.add_parser("recover", help="put the original faces of one sample back (Diff-Privacy keys + password)")
    recover.add_argument("cache", type=Path)
    recover.add_argument("index", type=int, help="the sample's index in the source")
    recover.add_argument("out", type=Path, help="output image (.png)")
    recover.add_argument("--slot", type=int, default=0, help="which image of the sample (default 0)")
    recover.add_argument("--method-dir", required=True, help="the Diff-Privacy weights directory (with msi/) the cache was made with")
    recover.add_argument("--base-model", default=None, help="SD v1.x directory (default: --method-dir)")
    recover.add_argument("--clip-model", default=None, help="CLIP ViT directory")
    recover.add_argument("--key-password-file", default=None, help="file holding the key password (or $ANONLOADER_KEY_PASSWORD)")
    _add_method_options(recover)
    recover.set_defaults(run=_run_recover)
    strip = actions.add_parser("strip-keys", help="copy a cache without its recovery keys")
    strip.add_argument("source", type=Path)
    strip.add_argument("destination", type=Path)
    strip.set_defaults(run=_run_strip_keys)
    for action in (stats, verify, merge, recover, strip):
        action.add_argument("--secret-env", default="ANONLOADER_SECRET", help="environment variable holding the secret")
        action.add_argument("--secret-file", default=None, help="file holding the secret")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs only these subcommands (``python -m anonloader.cache.commands``, e.g. under torchrun)."""
    from anonloader.errors import AnonloaderError

    parser = argparse.ArgumentParser(prog="anonloader")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (AnonloaderError, CacheError, CacheCorruptError) as error:
        print(f"anonloader {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
